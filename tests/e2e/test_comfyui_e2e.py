"""The pack inside a real ComfyUI server (CPU), driven like the web UI by comfy_run.py.

Needs ``COMFYUI_DIR`` (ComfyUI checkouts with their ``.venv``, several separated by ``os.pathsep``; see
tests/e2e/README.md); skipped otherwise.  For each checkout one server boot runs every workflow in order: the three graphs of the earlier pack's
examples (scaled down for CPU), our example workflows, then error cases, each followed by a good run
that proves the server is still healthy.  The models are the golden tiny models (released architectures,
random weights) saved under the released file names.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from comfy_dirs import (
    COMFY_RUN, COMFYUI_DIRS, ONLY_THIS_PACK, SKIP_REASON, has_native_seedvr2, ids, native_seedvr2_nodes,
    progress_throttle_s, stray_tracebacks,
)
from conftest import GOLDEN_DIR, REPO_ROOT, import_pack
from ui_workflow import image_upscale_workflow, opened_in_the_web_ui, video_upscale_workflow

NODES = ["SeedVR2VideoUpscaler", "SeedVR2LoadDiTModel", "SeedVR2LoadVAEModel", "SeedVR2TorchCompileSettings"]
INTERRUPT_TITLE = "SeedVR2 interrupt target"
WRONG_KIND = "seedvr2_ema_7b_fp16.safetensors"
WORKFLOW_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not COMFYUI_DIRS, reason=SKIP_REASON)

# Widget values in the earlier pack's order (doc §8), scaled down for a CPU and the tiny models.
DIT_FP8 = ["seedvr2_ema_3b_fp8_e4m3fn.safetensors", "cuda:0", 0, False, "none", False, "sdpa"]
DIT_7B_SWAP = ["seedvr2_ema_7b_sharp_fp16.safetensors", "cuda:0", 36, False, "cpu", False, "sdpa"]
DIT_3B_SWAP = ["seedvr2_ema_3b_fp16.safetensors", "cuda:0", 32, False, "cpu", False, "sdpa"]
VAE_PLAIN = ["ema_vae_fp16.safetensors", "cuda:0", False, 1024, 128, False, 1024, 128, "false", "none", False]
VAE_TILED = ["ema_vae_fp16.safetensors", "cuda:0", True, 64, 32, True, 64, 32, "false", "cpu", False]
COMFY_ORG_DIT = "seedvr2_3b_int8_convrot.safetensors"
COMFY_ORG_VAE = "seedvr2_ema_vae_fp16.safetensors"


def upscaler_values(seed=42, resolution=64, max_resolution=0, batch_size=1, uniform=False, overlap=0):
    return [seed, "fixed", resolution, max_resolution, batch_size, uniform, "lab", overlap, 0, 0, 0, "cpu", False]


# ------------------------------------------------------------------------------------------- fixtures data
def write_tiny_models(folder: Path) -> None:
    """The golden tiny weights under released file names (fp16, and an fp8 cast), plus a VAE under a name
    that does not say so (the VAE combo must still list it)."""
    from safetensors.torch import load_file, save_file

    def cast(name, dtype):
        tensors = load_file(str(GOLDEN_DIR / name))
        return {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}

    folder.mkdir(parents=True)
    save_file(cast("dit3b_weights.safetensors", torch.float16), str(folder / "seedvr2_ema_3b_fp16.safetensors"))
    save_file(cast("dit3b_weights.safetensors", torch.float8_e4m3fn),
              str(folder / "seedvr2_ema_3b_fp8_e4m3fn.safetensors"))
    save_file(cast("dit7b_weights.safetensors", torch.float16), str(folder / "seedvr2_ema_7b_sharp_fp16.safetensors"))
    vae = cast("vae_weights.safetensors", torch.float16)
    save_file(vae, str(folder / "ema_vae_fp16.safetensors"))
    save_file(vae, str(folder / "restoration_decoder.safetensors"))
    save_file(vae, str(folder / WRONG_KIND))  # a VAE under a released DiT name: listed for the DiT loader


def write_comfy_org_models(models: Path) -> None:
    """ComfyUI's own SeedVR2 layout where ComfyUI keeps it: an int8_convrot DiT (with its conditioning
    buffers) in models/diffusion_models, the VAE under Comfy-Org's second name in models/vae."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(REPO_ROOT))
    from tools import comfy_quantize

    emb = load_file(str(GOLDEN_DIR / "text_embeddings.safetensors"))
    tensors, _ = comfy_quantize.convert(load_file(str(GOLDEN_DIR / "dit3b_weights.safetensors")), "int8_convrot",
                                        conditioning=(emb["pos"], emb["neg"]), keep_reference=False)
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(models / "diffusion_models" / COMFY_ORG_DIT))
    (models / "vae").mkdir(parents=True, exist_ok=True)
    vae = {k: v.half() for k, v in load_file(str(GOLDEN_DIR / "vae_weights.safetensors")).items()}
    save_file(vae, str(models / "vae" / COMFY_ORG_VAE))


def write_image(path: Path, width: int, height: int, alpha: bool = False) -> None:
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    channels = [0.5 + 0.4 * torch.sin(9 * x), 0.5 + 0.4 * torch.cos(7 * y), (x + y) / 2]
    if alpha:
        channels.append((((x - 0.5) ** 2 + (y - 0.5) ** 2) < 0.16).float())
    array = (torch.stack(channels, -1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array, "RGBA" if alpha else "RGB").save(path)


def write_video(path: Path, width: int, height: int, frames: int, fps: int = 12) -> None:
    """An H.264 clip.  ``frames=0``: a clip whose only frame lies before the start of the video (negative
    time stamp), so decoders return no frame at all."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
        packets = []
        for i in range(max(frames, 1)):
            rgb = torch.stack([0.5 + 0.4 * torch.sin(8 * x + i / 2), 0.5 + 0.3 * torch.cos(5 * y), 0.4 + 0 * x], -1)
            frame = av.VideoFrame.from_ndarray((rgb * 255).round().to(torch.uint8).numpy(), format="rgb24")
            packets += stream.encode(frame)
        packets += stream.encode(None)
        if frames == 0:
            for packet in packets:
                packet.pts = packet.dts = -1
        container.mux(packets)


def video_info(path: str) -> tuple[int, int, int]:
    """(frames, width, height) of a video file."""
    import av

    with av.open(path) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


# ------------------------------------------------------------------------------------------- the run
def build_workflows(folder: Path, classes: dict) -> list[tuple[str, Path]]:
    """Every workflow of the run, in order: (key, file)."""
    workflows: list[tuple[str, dict]] = [
        ("simple_image", image_upscale_workflow(classes, "e2e_image.png", DIT_FP8, VAE_PLAIN,
                                                upscaler_values(resolution=64))),
        ("4k_image", image_upscale_workflow(classes, "e2e_rgba.png", DIT_7B_SWAP, VAE_TILED,
                                            upscaler_values(resolution=128, max_resolution=128), with_alpha=True)),
        ("hd_video", video_upscale_workflow(classes, "e2e_clip.mp4", DIT_3B_SWAP, VAE_TILED,
                                            upscaler_values(resolution=72, batch_size=9, uniform=True, overlap=3))),
    ]
    for key, name, resolution in (("example_image", "SeedVR2_image_upscale.json", 320),
                                  ("example_video", "SeedVR2_video_upscale.json", 180)):
        example = json.loads((REPO_ROOT / "example_workflows" / name).read_text())
        upscaler = next(n for n in example["nodes"] if n["type"] == "SeedVR2VideoUpscaler")
        upscaler["widgets_values"][2] = resolution  # the examples target 1080p; keep CPU time reasonable
        workflows.append((key, example))

    def healthy(seed: int) -> dict:  # a new seed each time, so ComfyUI cannot answer from its cache
        return image_upscale_workflow(classes, "e2e_image.png", DIT_FP8, VAE_PLAIN, upscaler_values(seed=seed))

    workflows += [
        ("comfy_org_files", image_upscale_workflow(classes, "e2e_image.png", [COMFY_ORG_DIT, *DIT_FP8[1:]],
                                                   [COMFY_ORG_VAE, *VAE_PLAIN[1:]], upscaler_values(seed=5))),
        # The earlier pack's PR #625 adds a trailing local_models_only toggle to both loaders.
        ("trailing_local_models_only", image_upscale_workflow(classes, "e2e_image.png", [*DIT_FP8, True],
                                                              [*VAE_PLAIN, True], upscaler_values(seed=6))),
    ]
    wrong_model = ["ema_vae_fp16.safetensors", *DIT_FP8[1:]]
    workflows += [
        ("wrong_model", image_upscale_workflow(classes, "e2e_image.png", wrong_model, VAE_PLAIN, upscaler_values())),
        ("wrong_kind", image_upscale_workflow(classes, "e2e_image.png", [WRONG_KIND, *DIT_FP8[1:]], VAE_PLAIN,
                                              upscaler_values())),
        ("after_wrong_model", healthy(1)),
        ("impossible_max_resolution", image_upscale_workflow(classes, "e2e_image.png", DIT_FP8, VAE_PLAIN,
                                                             upscaler_values(max_resolution=8))),
        ("resolution_over_max", image_upscale_workflow(classes, "e2e_image.png", DIT_FP8, VAE_PLAIN,
                                                       upscaler_values(resolution=20000))),
        ("bad_device", image_upscale_workflow(classes, "e2e_image.png", [DIT_FP8[0], "tpu", *DIT_FP8[2:]], VAE_PLAIN,
                                              upscaler_values())),
        ("after_resolution", healthy(2)),
        ("zero_frames", video_upscale_workflow(classes, "e2e_empty.mp4", DIT_FP8, VAE_PLAIN, upscaler_values())),
        ("after_zero_frames", healthy(3)),
        ("interrupt", video_upscale_workflow(classes, "e2e_clip.mp4", DIT_FP8, VAE_PLAIN,
                                             upscaler_values(resolution=144, batch_size=5), repeat_frames=40,
                                             upscaler_title=INTERRUPT_TITLE)),
        ("after_interrupt", healthy(4)),
    ]
    files = []
    for key, workflow in workflows:
        path = folder / f"{key}.json"
        path.write_text(json.dumps(opened_in_the_web_ui(workflow, classes)))
        files.append((key, path))
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_when_running(port: int, stop: threading.Event, delay_s: float = 3.0) -> None:
    """Press "Cancel" (POST /interrupt) a few seconds into the prompt whose upscaler has INTERRUPT_TITLE."""
    base = f"http://127.0.0.1:{port}"
    while not stop.wait(0.25):
        try:
            with urllib.request.urlopen(base + "/queue", timeout=5) as reply:
                running = json.load(reply).get("queue_running") or []
        except OSError:
            continue
        for entry in running:
            prompt = entry[2] if len(entry) > 2 else {}
            if any((n.get("_meta") or {}).get("title") == INTERRUPT_TITLE for n in prompt.values()):
                time.sleep(delay_s)
                body = json.dumps({"prompt_id": entry[1]}).encode()
                request = urllib.request.Request(base + "/interrupt", data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=5).close()
                return


@pytest.fixture(scope="module", params=COMFYUI_DIRS, ids=ids())
def comfy(request, tmp_path_factory):
    """Run comfy_run.py once per checkout; returns (report, object_info, {workflow key: workflow report})."""
    comfyui_dir = request.param
    if not COMFY_RUN.is_file():
        pytest.skip(f"comfy_run.py not found at {COMFY_RUN} (set COMFY_RUN)")
    root = tmp_path_factory.mktemp("comfy_e2e")
    write_tiny_models(root / "models" / "SEEDVR2")
    write_comfy_org_models(root / "models")
    inputs = root / "input"
    inputs.mkdir()
    write_image(inputs / "e2e_image.png", 48, 32)
    write_image(inputs / "e2e_rgba.png", 40, 40, alpha=True)
    write_video(inputs / "e2e_clip.mp4", 64, 36, frames=13)
    write_video(inputs / "e2e_empty.mp4", 64, 36, frames=0)
    for asset in ("example_image.png", "example_clip.mp4"):
        (inputs / asset).write_bytes((REPO_ROOT / "assets" / asset).read_bytes())
    workflows = build_workflows(root, import_pack().NODE_CLASS_MAPPINGS)

    port = free_port()
    expected = NODES + (native_seedvr2_nodes(comfyui_dir) if has_native_seedvr2(comfyui_dir) else [])
    command = [
        sys.executable, str(COMFY_RUN), "--comfy", comfyui_dir, "--pack", str(REPO_ROOT), "--port", str(port),
        "--models", str(root / "models"), "--input-dir", str(inputs), "--output-dir", str(root / "output"),
        "--expect-node", ",".join(expected), "--dump-object-info", str(root / "object_info.json"),
        "--timeout", str(WORKFLOW_TIMEOUT_S), "--report", str(root / "report.json"), "--log-lines", "200",
        "--log", str(root / "server.log"), *(f"--server-arg={arg}" for arg in ONLY_THIS_PACK),
    ]
    for _key, path in workflows:
        command += ["--workflow", str(path)]
    stop = threading.Event()
    interrupter = threading.Thread(target=interrupt_when_running, args=(port, stop), daemon=True)
    interrupter.start()
    try:
        subprocess.run(command, capture_output=True, text=True, timeout=60 + WORKFLOW_TIMEOUT_S * (len(workflows) + 1))
    finally:
        stop.set()
    report = json.loads((root / "report.json").read_text())
    object_info_file = root / "object_info.json"
    object_info = json.loads(object_info_file.read_text()) if object_info_file.exists() else {}
    by_key = {key: run for (key, _path), run in zip(workflows, report.get("workflows", []))}
    log_file = root / "server.log"
    report["server_log"] = log_file.read_text(errors="replace") if log_file.exists() else ""
    report["comfyui_dir"] = comfyui_dir
    return report, object_info, by_key


def test_models_are_placed_by_comfyui_model_management(comfy):
    """Our DiT and VAE are handed to comfy.model_management (wrapped in its ModelPatcher), so ComfyUI knows
    the memory they hold and can unload them like its own models."""
    report, _info, _runs = comfy
    log = report["server_log"]
    assert "Requested to load SeedVR2Model" in log, log[-3000:]
    # Models dropped after a run leave ComfyUI's list cleanly (no dangling entries it would flag).
    assert "memory leak" not in log, log[-3000:]


def explain(run: dict) -> str:
    """What went wrong in one workflow run, for assertion messages."""
    error = run.get("error") or {}
    return json.dumps({k: run.get(k) for k in ("status", "failure", "node_errors", "conversion_notes")}
                      | {"error": {k: error.get(k) for k in ("node_type", "exception_type", "exception_message")}},
                      indent=1)[:3000]


def node_error(run: dict) -> tuple[str, str]:
    """(node type, message) of a runtime error."""
    error = run.get("error") or {}
    return error.get("node_type", ""), f"{error.get('exception_type', '')}: {error.get('exception_message', '')}"


# ------------------------------------------------------------------------------------------- smoke
def test_pack_imports_and_registers_all_nodes(comfy):
    report, _info, _runs = comfy
    assert report["server"].get("boot_seconds") is not None, report.get("server_log_tail")
    in_pack = [f for f in report.get("import_failures", []) if f.get("in_pack")]
    assert not in_pack, in_pack
    assert report["expected_nodes"]["missing"] == [], report.get("server_log_tail")


def test_object_info_shows_our_definitions(comfy):
    _report, info, _runs = comfy
    classes = import_pack().NODE_CLASS_MAPPINGS
    for name in NODES:
        ours = classes[name].INPUT_TYPES()
        assert info[name]["input_order"]["required"] == list(ours["required"])
        assert info[name]["input_order"].get("optional", []) == list(ours.get("optional", {}))
        assert info[name]["category"] == "SEEDVR2"
    dit_inputs = info["SeedVR2LoadDiTModel"]["input"]
    vae_inputs = info["SeedVR2LoadVAEModel"]["input"]
    # A CPU-only server (--cpu) still lists devices, so the loaders register.
    assert dit_inputs["required"]["device"][0] == ["auto", "cpu"]
    assert vae_inputs["optional"]["offload_device"][0] == ["none", "cpu"]
    # The models folder given through extra_model_paths (key "SEEDVR2") is searched; VAEs are told apart
    # by their tensors, not their names.
    dit_models, vae_models = dit_inputs["required"]["model"][0], vae_inputs["required"]["model"][0]
    assert "restoration_decoder.safetensors" in vae_models
    assert "restoration_decoder.safetensors" not in dit_models
    assert {"seedvr2_ema_3b_fp16.safetensors", "seedvr2_ema_7b_sharp_fp16.safetensors"} <= set(dit_models)


# ------------------------------------------------------------------------------------------- workflows
def output_file(run: dict) -> dict:
    files = [item for node in run["outputs"].values() for items in node.values() if isinstance(items, list)
             for item in items if isinstance(item, dict) and item.get("exists")]
    assert len(files) == 1, run["outputs"]
    return files[0]


@pytest.mark.parametrize("key, size", [
    ("simple_image", (96, 64)),
    ("4k_image", (128, 128)),
    ("example_image", (480, 320)),
])
def test_image_workflow_succeeds(comfy, key, size):
    run = comfy[2][key]
    assert run["status"] == "success", explain(run)
    image = output_file(run)
    assert (image["width"], image["height"]) == size


def test_comfy_org_files_in_comfyuis_folders_are_listed_and_run(comfy):
    _report, info, runs = comfy
    assert COMFY_ORG_DIT in info["SeedVR2LoadDiTModel"]["input"]["required"]["model"][0]
    assert COMFY_ORG_VAE in info["SeedVR2LoadVAEModel"]["input"]["required"]["model"][0]
    assert COMFY_ORG_DIT not in info["SeedVR2LoadVAEModel"]["input"]["required"]["model"][0]
    run = runs["comfy_org_files"]
    assert run["status"] == "success", explain(run)
    assert (output_file(run)["width"], output_file(run)["height"]) == (96, 64)


def test_workflow_with_a_trailing_local_models_only_value_runs(comfy):
    run = comfy[2]["trailing_local_models_only"]
    assert run["status"] == "success", explain(run)


def test_rgba_input_keeps_its_alpha(comfy):
    from PIL import Image

    path = output_file(comfy[2]["4k_image"])["path"]
    assert Image.open(path).mode == "RGBA"


@pytest.mark.parametrize("key, frames, size", [("hd_video", 13, (128, 72)), ("example_video", 21, (320, 180))])
def test_video_workflow_succeeds(comfy, key, frames, size):
    run = comfy[2][key]
    assert run["status"] == "success", explain(run)
    count, width, height = video_info(output_file(run)["path"])
    assert (count, (width, height)) == (frames, size)


def test_progress_bar_moves_during_the_upscale(comfy):
    ticks = [t for t in comfy[2]["hd_video"].get("progress_ticks", []) if t["max"] == 1000]
    values = [t["value"] for t in ticks]
    assert len(values) >= 4 and values == sorted(values) and values[-1] == 1000, ticks


@pytest.mark.parametrize("key", ["simple_image", "hd_video"])
def test_progress_moves_inside_every_phase(comfy, key):
    """The bar's shares (nodes/progress.py): encode [0, 200), DiT [200, 450), decode [450, 950); a single
    image (one batch per phase) still moves inside each."""
    if progress_throttle_s(comfy[0]["comfyui_dir"]):
        pytest.skip("this ComfyUI sends at most one progress message per "
                    f"{progress_throttle_s(comfy[0]['comfyui_dir'])} s, longer than these phases last; "
                    "test_comfyui_lifecycle checks progress inside the phases of a slower single image")
    values = [t["value"] for t in comfy[2][key].get("progress_ticks", []) if t["max"] == 1000]
    for low, high in ((0, 200), (200, 450), (450, 950)):
        assert len({v for v in values if low < v < high}) >= 3, (low, high, values)


def test_comfyuis_own_seedvr2_nodes_load_beside_ours(comfy):
    report = comfy[0]
    if not has_native_seedvr2(report["comfyui_dir"]):
        pytest.skip("this ComfyUI has no SeedVR2 nodes of its own")
    native = native_seedvr2_nodes(report["comfyui_dir"])
    assert native and report["expected_nodes"]["missing"] == [], report["expected_nodes"]
    assert not [f for f in report.get("builtin_import_failures", []) if "seedvr" in f["module"].lower()]


def test_no_traceback_in_the_server_log(comfy):
    """Over the whole run, error cases included: the only tracebacks are ComfyUI's reports of the node errors
    the error cases provoke; no thread prints one (the prefault thread did on every run)."""
    assert stray_tracebacks(comfy[0]["server_log"]) == []


def test_vae_file_selected_as_dit_is_a_clear_loader_error(comfy):
    run = comfy[2]["wrong_kind"]
    assert run["status"] == "failed"
    node, message = node_error(run)
    assert node == "SeedVR2LoadDiTModel", explain(run)
    assert WRONG_KIND in message and "VAE" in message


def test_a_vae_name_in_the_dit_loader_is_one_validation_error_on_model(comfy):
    """The DiT combo does not list the released VAE: ComfyUI rejects it once, on the ``model`` input."""
    run = comfy[2]["wrong_model"]
    assert run["failure"].startswith("prompt rejected"), explain(run)
    errors = [e for node in run["node_errors"].values() for e in node["errors"]]
    assert [e["extra_info"]["input_name"] for e in errors] == ["model"], errors
    assert "ema_vae_fp16.safetensors" in errors[0]["details"]


def test_impossible_resolution_is_a_clear_error(comfy):
    run = comfy[2]["impossible_max_resolution"]
    node, message = node_error(run)
    assert node == "SeedVR2VideoUpscaler", explain(run)
    assert "max_resolution" in message
    rejected = comfy[2]["resolution_over_max"]
    assert rejected["failure"].startswith("prompt rejected"), explain(rejected)
    errors = [e for node in rejected["node_errors"].values() for e in node["errors"]]
    assert any(e["type"] == "value_bigger_than_max" and e["extra_info"]["input_name"] == "resolution" for e in errors)


def test_unknown_device_name_is_rejected_at_validation(comfy):
    run = comfy[2]["bad_device"]
    assert run["failure"].startswith("prompt rejected"), explain(run)
    (errors,) = [node["errors"] for node in run["node_errors"].values()]
    details = [e["details"] for e in errors if e["type"] == "custom_validation_failed"]
    assert details and all("device: 'tpu' is not a device" in d for d in details), errors
    # ComfyUI attaches the answer to each input VALIDATE_INPUTS takes: the two device inputs and, on the DiT
    # loader, quantization (taken so that a PR #625 workflow's trailing toggle there is not refused); never the
    # model.  The message itself names the input it is about.
    assert {e["extra_info"]["input_name"] for e in errors} <= {"device", "offload_device", "quantization"}, errors


def test_zero_frames_is_a_clear_error(comfy):
    run = comfy[2]["zero_frames"]
    node, message = node_error(run)
    assert node == "SeedVR2VideoUpscaler", explain(run)
    assert "no frames" in message


def test_interrupt_stops_the_upscaler(comfy):
    run = comfy[2]["interrupt"]
    assert run["status"] == "failed" and run.get("status_str") == "error", explain(run)
    assert (run.get("error") or {}).get("node_type") == "SeedVR2VideoUpscaler", explain(run)
    assert "exception_message" not in run["error"]  # an interruption, not a crash
    assert run["wall_seconds"] < WORKFLOW_TIMEOUT_S / 2


@pytest.mark.parametrize("key", ["after_wrong_model", "after_resolution", "after_zero_frames", "after_interrupt"])
def test_server_stays_healthy_after_an_error(comfy, key):
    run = comfy[2][key]
    assert run["status"] == "success", explain(run)
    assert output_file(run)["width"] == 96
