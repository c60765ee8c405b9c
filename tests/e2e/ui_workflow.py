"""Build ComfyUI workflow files in the UI ("Save") format, laid out like the earlier SeedVR2 pack's examples.

The graphs match its three example workflows (node types, widget order, which nodes are bypassed, how the
sockets are wired: image -> upscaler slot 0, DiT -> slot 1, VAE -> slot 2, compile settings -> slot 0 of
both loaders).  Used by the end-to-end tests and to write ``example_workflows/``.
"""
from __future__ import annotations

import uuid

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
BYPASSED = 4

# Core nodes used by the examples: (input sockets, widget inputs, outputs), as ComfyUI 0.8.0 lays them out.
CORE_NODES = {
    "LoadImage": ([], [("image", "COMBO"), ("upload", "IMAGEUPLOAD")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "JoinImageWithAlpha": ([("image", "IMAGE"), ("alpha", "MASK")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], [("filename_prefix", "STRING")], []),
    "LoadVideo": ([], [("file", "COMBO"), ("upload", "IMAGEUPLOAD")], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO")], [], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO")], [("fps", "FLOAT")], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], [("filename_prefix", "STRING"), ("format", "COMBO"), ("codec", "COMBO")], []),
    "RepeatImageBatch": ([("image", "IMAGE")], [("amount", "INT")], [("IMAGE", "IMAGE")]),
}


def pack_node_layout(node_class) -> tuple[list, list, list]:
    """(input sockets, widget inputs, outputs) of one of our V1 node classes, in the UI's order."""
    sockets, widgets, optional = [], [], set()
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *_opts) in spec.get(section, {}).items():
            if section == "optional":
                optional.add(name)
            if isinstance(kind, list):
                widgets.append((name, "COMBO"))
            elif kind in WIDGET_TYPES:
                widgets.append((name, kind))
            else:
                sockets.append((name, kind))
    outputs = [(kind, kind) for kind in node_class.RETURN_TYPES]
    return sockets, widgets, outputs


class UIWorkflow:
    """A litegraph (version 0.4) workflow document, built node by node."""

    def __init__(self, node_classes: dict):
        self.node_classes = node_classes
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, widgets_values: list, pos: tuple[int, int], *, mode: int = 0,
            title: str | None = None, size: tuple[int, int] = (300, 200)) -> int:
        """Add a node; returns its id."""
        if node_type in ("Note", "MarkdownNote"):
            sockets, widgets, outputs = [], [], []
            properties = {}
        elif node_type in CORE_NODES:
            sockets, widgets, outputs = CORE_NODES[node_type]
            properties = {"cnr_id": "comfy-core", "ver": "0.8.0", "Node name for S&R": node_type}
        else:
            sockets, widgets, outputs = pack_node_layout(self.node_classes[node_type])
            properties = {"Node name for S&R": node_type}
        node_id = len(self.nodes) + 1
        node = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
            "order": node_id - 1, "mode": mode,
            "inputs": [{"localized_name": n, "name": n, "type": t, "link": None} for n, t in sockets]
            + [{"localized_name": n, "name": n, "type": t, "widget": {"name": n}, "link": None} for n, t in widgets],
            "outputs": [{"localized_name": n, "name": n, "type": t, "links": []} for n, t in outputs],
            "properties": properties,
            "widgets_values": list(widgets_values),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def connect(self, origin: int, origin_slot: int, target: int, input_name: str) -> None:
        """Link output ``origin_slot`` of node ``origin`` to the input called ``input_name`` of ``target``."""
        source, sink = self.nodes[origin - 1], self.nodes[target - 1]
        slot = next(i for i, inp in enumerate(sink["inputs"]) if inp["name"] == input_name)
        link_id = len(self.links) + 1
        link_type = source["outputs"][origin_slot]["type"]
        self.links.append([link_id, origin, origin_slot, target, slot, link_type])
        source["outputs"][origin_slot]["links"].append(link_id)
        sink["inputs"][slot]["link"] = link_id

    def to_json(self) -> dict:
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, repr([n["type"] for n in self.nodes]))),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
        }


def _loaders(wf: UIWorkflow, dit_values: list, vae_values: list) -> tuple[int, int]:
    """The compile settings node (bypassed, as in the examples) feeding both loaders."""
    compile_id = wf.add("SeedVR2TorchCompileSettings", ["inductor", "default", False, False, 64, 128],
                        (-380, 320), mode=BYPASSED, size=(310, 180))
    wf.add("Note", ["Enable to compile the DiT and VAE with torch.compile: the first batch pays for "
                    "compilation, later batches run faster. Worth it for long videos, not single images."],
           (-380, 540), size=(310, 100))
    dit_id = wf.add("SeedVR2LoadDiTModel", dit_values, (60, 120), size=(310, 260))
    vae_id = wf.add("SeedVR2LoadVAEModel", vae_values, (60, 420), size=(310, 340))
    wf.connect(compile_id, 0, dit_id, "torch_compile_args")
    wf.connect(compile_id, 0, vae_id, "torch_compile_args")
    return dit_id, vae_id


def image_upscale_workflow(node_classes: dict, image: str, dit_values: list, vae_values: list,
                           upscaler_values: list, *, with_alpha: bool = False,
                           upscaler_title: str | None = None, input_note: str | None = None) -> dict:
    """LoadImage -> JoinImageWithAlpha (active only ``with_alpha``) -> upscaler -> SaveImage."""
    wf = UIWorkflow(node_classes)
    dit_id, vae_id = _loaders(wf, dit_values, vae_values)
    load_id = wf.add("LoadImage", [image, "image"], (80, -280), size=(280, 320))
    if input_note:
        wf.add("Note", [input_note], (-240, -280), size=(280, 100))
    join_id = wf.add("JoinImageWithAlpha", [], (420, -270), mode=0 if with_alpha else BYPASSED, size=(180, 50))
    wf.add("Note", ["Enable to upscale the alpha channel too (RGBA inputs)."], (420, -170), size=(210, 90))
    upscaler_id = wf.add("SeedVR2VideoUpscaler", upscaler_values, (840, 100), title=upscaler_title, size=(300, 390))
    save_id = wf.add("SaveImage", ["SeedVR2"], (1180, 100), size=(280, 280))
    wf.connect(load_id, 0, join_id, "image")
    wf.connect(load_id, 1, join_id, "alpha")
    wf.connect(join_id, 0, upscaler_id, "image")
    wf.connect(dit_id, 0, upscaler_id, "dit")
    wf.connect(vae_id, 0, upscaler_id, "vae")
    wf.connect(upscaler_id, 0, save_id, "images")
    return wf.to_json()


def video_upscale_workflow(node_classes: dict, video: str, dit_values: list, vae_values: list,
                           upscaler_values: list, *, repeat_frames: int = 0,
                           upscaler_title: str | None = None, input_note: str | None = None) -> dict:
    """LoadVideo -> GetVideoComponents -> JoinImageWithAlpha (bypassed) -> upscaler -> CreateVideo (the
    source's fps and audio) -> SaveVideo.  ``repeat_frames`` > 0 inserts RepeatImageBatch (long inputs)."""
    wf = UIWorkflow(node_classes)
    dit_id, vae_id = _loaders(wf, dit_values, vae_values)
    load_id = wf.add("LoadVideo", [video, "image"], (-380, -300), size=(280, 330))
    if input_note:
        wf.add("Note", [input_note], (-700, -300), size=(280, 100))
    parts_id = wf.add("GetVideoComponents", [], (-60, -300), size=(200, 70))
    join_id = wf.add("JoinImageWithAlpha", [], (420, -270), mode=BYPASSED, size=(180, 50))
    wf.add("Note", ["Enable and connect a mask to upscale an alpha channel too."], (420, -170), size=(210, 90))
    upscaler_id = wf.add("SeedVR2VideoUpscaler", upscaler_values, (840, 100), title=upscaler_title, size=(300, 390))
    create_id = wf.add("CreateVideo", [30], (1180, 100), size=(270, 80))
    save_id = wf.add("SaveVideo", ["video/SeedVR2", "auto", "auto"], (1480, 100), size=(300, 300))
    wf.connect(load_id, 0, parts_id, "video")
    frames_from = parts_id
    if repeat_frames:
        frames_from = wf.add("RepeatImageBatch", [repeat_frames], (180, -300), size=(220, 60))
        wf.connect(parts_id, 0, frames_from, "image")
    wf.connect(frames_from, 0, join_id, "image")
    wf.connect(join_id, 0, upscaler_id, "image")
    wf.connect(dit_id, 0, upscaler_id, "dit")
    wf.connect(vae_id, 0, upscaler_id, "vae")
    wf.connect(upscaler_id, 0, create_id, "images")
    wf.connect(parts_id, 1, create_id, "audio")
    wf.connect(parts_id, 2, create_id, "fps")
    wf.connect(create_id, 0, save_id, "video")
    return wf.to_json()


def _widget_slots(node_class) -> list:
    """The default value of every widgets_values slot the web UI gives one of our nodes, in order: one per
    widget input (as :func:`pack_node_layout` lays them out), plus the seed's "control after generate" slot
    right after it."""
    spec = node_class.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    slots = []
    for name, kind in pack_node_layout(node_class)[1]:
        choices, *rest = declared[name]
        options = rest[0] if rest else {}
        slots.append(options.get("default", choices[0] if kind == "COMBO" and choices else None))
        if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
            slots.append("fixed")
    return slots


def opened_in_the_web_ui(workflow: dict, node_classes: dict) -> dict:
    """``workflow`` as the web UI holds it after opening the file: widgets_values are assigned to the widgets
    by position, so widgets a saved workflow has no value for (inputs added after it was saved, always at the
    end) keep their defaults.  A stand-in for that step: comfy_run.py's API conversion cannot tell a missing
    trailing value from the seed's control slot by counting, so it is given the values the UI would queue."""
    for node in workflow["nodes"]:
        node_class = node_classes.get(node["type"])
        values = node.get("widgets_values")
        if node_class is None or not isinstance(values, list):
            continue
        slots = _widget_slots(node_class)
        if len(values) < len(slots):
            node["widgets_values"] = values + slots[len(values):]
    return workflow
