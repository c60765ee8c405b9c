"""How the pack lives inside a running ComfyUI server (CPU): Cancel inside each phase, models released when
ComfyUI frees memory, ``cache_model`` off, progress inside a phase, where validation errors are attached.

One server per ComfyUI checkout in ``COMFYUI_DIR`` runs a fixed scenario (the ``scenario`` fixture), driven
step by step with comfy_run.py's server, websocket client and workflow runner; the tests check what it
recorded.  Models: a DiT of the 3B's layout made wide enough (about 40 M parameters, 170 MB in float32) that
its memory shows in the server's RSS, the tiny golden 3B as fp8 and the tiny VAE.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from comfy_dirs import COMFY_RUN, COMFYUI_DIRS, ONLY_THIS_PACK, SKIP_REASON, ids, load_comfy_run, stray_tracebacks
from conftest import GOLDEN_DIR, REPO_ROOT, import_pack
from test_comfyui_e2e import write_image, write_video
from ui_workflow import image_upscale_workflow, opened_in_the_web_ui, video_upscale_workflow

pytestmark = pytest.mark.skipif(not COMFYUI_DIRS, reason=SKIP_REASON)

WIDE_DIT = "seedvr2_ema_3b_fp16.safetensors"       # the wide DiT, under a released name
TINY_DIT = "seedvr2_ema_3b_fp8_e4m3fn.safetensors"
VAE = "ema_vae_fp16.safetensors"
PHASES = {"encode": (0, 200), "upscale": (200, 450), "decode": (450, 950)}  # nodes/progress.py's bar shares
INTERRUPT_LATENCY_S = 1.0
WORKFLOW_TIMEOUT_S = 400


def dit_values(model, cache):
    return [model, "cpu", 0, False, "none", cache, "sdpa"]


def vae_values(cache):
    return [VAE, "cpu", False, 1024, 128, False, 1024, 128, "false", "none", cache]


def upscaler_values(seed, resolution=64, batch_size=1, debug=False):
    return [seed, "fixed", resolution, 0, batch_size, False, "lab", 0, 0, 0, 0, "cpu", debug]


def write_models(folder: Path) -> int:
    """The models; returns the wide DiT's parameter bytes once loaded (float32 on the CPU)."""
    from safetensors.torch import load_file, save_file

    from src.benchmark.random_weights import random_dit
    from src.models.dit.config import NaDiTConfig

    folder.mkdir(parents=True)
    kwargs = json.loads((GOLDEN_DIR / "dit3b_config.json").read_text())["kwargs"]
    layers = 16
    kwargs.update(vid_dim=384, txt_dim=384, emb_dim=6 * 384, heads=6, head_dim=64, rope_dim=64, num_layers=layers,
                  mm_layers=2, block_type=["mmdit_sr"] * layers, window=[[4, 3, 3]] * layers,
                  window_method=["720pwin_by_size_bysize", "720pswin_by_size_bysize"] * (layers // 2))
    wide = random_dit(NaDiTConfig.from_kwargs(kwargs), "cpu", torch.float16)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(folder / WIDE_DIT))
    wide_bytes = 4 * sum(t.numel() for t in wide.state_dict().values())
    tiny = load_file(str(GOLDEN_DIR / "dit3b_weights.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in tiny.items()},
              str(folder / TINY_DIT))
    vae = load_file(str(GOLDEN_DIR / "vae_weights.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in vae.items()}, str(folder / VAE))
    return wide_bytes


class Session:
    """One ComfyUI server with the pack, driven workflow by workflow."""

    def __init__(self, comfy_dir: str, root: Path):
        self.run_module = cr = load_comfy_run()
        self.root = root
        inputs, models = root / "input", root / "models"
        self.args = cr.parse_args(["--comfy", comfy_dir, "--pack", str(REPO_ROOT), "--timeout", str(WORKFLOW_TIMEOUT_S),
                                   "--log", str(root / "server.log"), "--output-dir", str(root / "output")])
        self.created, _paths = cr.link_packs(self.args, comfy_dir)
        extra = ["--extra-model-paths-config", cr.models_yaml(str(models), str(root)),
                 "--input-directory", str(inputs), "--output-directory", str(root / "output"), *ONLY_THIS_PACK]
        self.server = cr.Server(self.args, comfy_dir, str(Path(comfy_dir) / ".venv" / "bin" / "python"), str(root))
        # glibc serves blocks from its heap once a freed mapping raised its threshold, and keeps freed heap
        # memory mapped: with a fixed threshold every tensor is its own mapping, so RSS shows what is freed.
        previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            self.server.start(extra)
        finally:
            if previous is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
        _status, self.object_info = cr.http_json(self.server.base, "/object_info", timeout=120)
        self.client_id = uuid.uuid4().hex
        self.ws = cr.WSClient("127.0.0.1", self.server.port, self.client_id, cr.now())

    def close(self) -> None:
        self.ws.close()
        self.server.stop()
        self.run_module.unlink_packs(self.created)

    def run(self, name: str, workflow: dict) -> dict:
        path = self.root / f"{name}.json"
        path.write_text(json.dumps(opened_in_the_web_ui(workflow, import_pack().NODE_CLASS_MAPPINGS)))
        return self.run_module.run_workflow(self.server, self.ws, self.client_id, str(path), self.object_info,
                                            self.args, str(self.root))

    def now(self) -> float:
        """Seconds on the websocket client's clock (its events' ``t``)."""
        return self.run_module.now() - self.ws.t0

    def events(self) -> list[dict]:
        with self.ws._lock:
            return list(self.ws.events)

    def post(self, path: str, body: dict) -> None:
        self.run_module.http_json(self.server.base, path, body)

    def rss(self) -> int:
        """The server's resident memory in bytes."""
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.server.log_text()

    def loads(self, kind: str) -> int:
        return self.log().count(f"SeedVR2: loading {kind} ")

    def interrupt_in(self, phase: str, workflow: dict) -> dict:
        """Run ``workflow`` and press Cancel once its progress is inside ``phase``; returns timings."""
        low, high = PHASES[phase]
        seen = len(self.events())
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(run=self.run(f"interrupt_{phase}", workflow)))
        runner.start()
        posted = None
        deadline = time.monotonic() + WORKFLOW_TIMEOUT_S
        while posted is None and runner.is_alive() and time.monotonic() < deadline:
            for event in self.events()[seen:]:
                value = (event.get("data") or {}).get("value") if event.get("type") == "progress" else None
                if value is not None and (event.get("data") or {}).get("max") == 1000 and low < value < high:
                    posted = self.now()
                    self.post("/interrupt", {})
                    break
            time.sleep(0.02)
        runner.join(WORKFLOW_TIMEOUT_S)
        events = self.events()[seen:]
        stopped = [e["t"] for e in events if e.get("type") == "execution_interrupted"]
        ticks = [(e["t"], e["data"]["value"]) for e in events
                 if e.get("type") == "progress" and (e.get("data") or {}).get("max") == 1000]
        last_value = max((value for t, value in ticks if posted is not None and t <= stopped[0]), default=None) \
            if stopped else None
        return {"posted": posted, "stopped": stopped[0] if stopped else None, "last_value": last_value,
                "run": result.get("run", {})}


@pytest.fixture(scope="module", params=COMFYUI_DIRS, ids=ids())
def scenario(request, tmp_path_factory):
    if not COMFY_RUN.is_file():
        pytest.skip(f"comfy_run.py not found at {COMFY_RUN} (set COMFY_RUN)")
    root = tmp_path_factory.mktemp("comfy_lifecycle")
    wide_bytes = write_models(root / "models" / "SEEDVR2")
    (root / "input").mkdir()
    write_image(root / "input" / "life_image.png", 48, 32)
    write_image(root / "input" / "life_large.png", 512, 384)
    write_video(root / "input" / "life_clip.mp4", 64, 36, frames=13)
    classes = import_pack().NODE_CLASS_MAPPINGS
    session = Session(request.param, root)
    results: dict = {"wide_bytes": wide_bytes}
    try:
        def image(seed, cache, model=WIDE_DIT, debug=False, name="life_image.png", resolution=64):
            return image_upscale_workflow(classes, name, dit_values(model, cache), vae_values(cache),
                                          upscaler_values(seed, resolution=resolution, debug=debug))

        # Imports and first-use caches come with the first run; the baseline is taken after it.
        results["warm_up"] = session.run("warm_up", image(0, cache=False))
        results["rss_before"] = session.rss()
        loads = [session.loads("DiT")]
        for seed in (1, 2):
            results[f"cached_{seed}"] = session.run(f"cached_{seed}", image(seed, cache=True))
            loads.append(session.loads("DiT"))
        results["rss_cached"] = session.rss()
        # Phases long enough (about a second each on a CPU) for ComfyUI 0.19's one progress message per 0.1 s.
        results["large_image"] = session.run("large_image", image(6, cache=True, name="life_large.png",
                                                                  resolution=384))
        session.post("/free", {"unload_models": True, "free_memory": True})
        deadline = time.monotonic() + 30
        while "releasing the cached DIT" not in session.log() and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(1.0)
        results["rss_freed"] = session.rss()
        results["cached_3"] = session.run("cached_3", image(3, cache=True))
        loads.append(session.loads("DiT"))
        for seed in (4, 5):
            results[f"uncached_{seed}"] = session.run(f"uncached_{seed}", image(seed, cache=False))
            loads.append(session.loads("DiT"))
        results["dit_loads"] = loads

        # Cancel inside each phase of a 39-frame clip in 1-frame batches, between two identical probes.
        results["probe_before"] = session.run("probe_before", image(7, cache=True, model=TINY_DIT))
        clip = video_upscale_workflow(classes, "life_clip.mp4", dit_values(TINY_DIT, True), vae_values(True),
                                      upscaler_values(9, resolution=96), repeat_frames=3)
        for phase in PHASES:
            results[f"interrupt_{phase}"] = session.interrupt_in(phase, clip)
        results["probe_after"] = session.run("probe_after", image(7, cache=True, model=TINY_DIT, debug=True))

        missing = image_upscale_workflow(classes, "life_image.png", dit_values("my_finetune.safetensors", False),
                                         vae_values(False), upscaler_values(8))
        results["missing_model"] = session.run("missing_model", missing)
        results["healthy"] = session.run("healthy", image(10, cache=False, model=TINY_DIT))
    finally:
        session.close()
    results["log"] = (root / "server.log").read_text(errors="replace")
    return results


def explain(run: dict) -> str:
    return json.dumps({k: run.get(k) for k in ("status", "failure", "node_errors", "error")}, indent=1)[:6000]


# ------------------------------------------------------------------------------------------- tests
def test_every_run_of_the_scenario_succeeds(scenario):
    for key in ("warm_up", "cached_1", "cached_2", "large_image", "cached_3", "uncached_4", "uncached_5", "probe_before",
                "probe_after", "healthy"):
        assert scenario[key]["status"] == "success", (key, explain(scenario[key]))


def test_cached_models_are_reused_until_comfyui_frees_memory_then_loaded_again(scenario):
    warm, cached_1, cached_2, freed_then_cached, uncached_4, uncached_5 = scenario["dit_loads"]
    assert cached_1 == warm + 1                    # cache_model on: loaded once ...
    assert cached_2 == cached_1                    # ... and reused
    assert freed_then_cached == cached_2 + 1       # POST /free released it: the next run reads the file again
    assert uncached_4 == freed_then_cached + 1     # cache_model off: every run loads afresh
    assert uncached_5 == uncached_4 + 1


def test_server_memory_returns_after_comfyui_frees_it(scenario):
    """The wide DiT (170 MB in float32) shows in the server's RSS while cached and is gone after POST /free."""
    wide, before, cached, freed = (scenario[k] for k in ("wide_bytes", "rss_before", "rss_cached", "rss_freed"))
    assert cached - before > 0.7 * wide, (before, cached, wide)
    assert freed - before < 0.25 * wide, (before, freed, wide)


def test_the_reported_memory_figures_are_the_model_sizes(scenario):
    """ComfyUI logs the bytes we hand it: the wide DiT's parameters in float32."""
    loaded = [float(part.split(" MB loaded")[0].rsplit(",", 1)[-1].split(";")[-1])
              for part in scenario["log"].split("loaded completely")[1:]]
    assert any(abs(mb * 2**20 - scenario["wide_bytes"]) < 0.02 * scenario["wide_bytes"] for mb in loaded), loaded


@pytest.mark.parametrize("phase", list(PHASES))
def test_cancel_lands_within_a_second_inside_the_phase(scenario, phase):
    result = scenario[f"interrupt_{phase}"]
    assert result["posted"] is not None, ("the phase was never seen", explain(result["run"]))
    assert result["stopped"] is not None, explain(result["run"])
    assert result["stopped"] - result["posted"] < INTERRUPT_LATENCY_S, result
    low, high = PHASES[phase]
    assert low < result["last_value"] < high, result   # it stopped in that phase, not after it


def test_a_run_after_the_interrupts_is_identical_to_one_before(scenario):
    from PIL import Image

    def pixels(run):
        files = [item["path"] for node in run["outputs"].values() for items in node.values()
                 if isinstance(items, list) for item in items if isinstance(item, dict) and item.get("exists")]
        return Image.open(files[0]).tobytes()

    assert pixels(scenario["probe_before"]) == pixels(scenario["probe_after"])


def test_a_single_image_shows_progress_inside_every_phase(scenario):
    ticks = [t["value"] for t in scenario["large_image"]["progress_ticks"] if t["max"] == 1000]
    for phase, (low, high) in PHASES.items():
        inside = {value for value in ticks if low < value < high}
        assert len(inside) >= 3, (phase, ticks)


def test_the_phase_is_named_in_the_log(scenario):
    for title in ("SeedVR2: encoding, 1 batch(es)", "SeedVR2: upscaling (DiT), 1 batch(es)",
                  "SeedVR2: decoding, 1 batch(es)"):
        assert title in scenario["log"]


def test_a_missing_model_is_one_error_on_the_model_input(scenario):
    run = scenario["missing_model"]
    assert run["failure"].startswith("prompt rejected"), explain(run)
    errors = [e for node in run["node_errors"].values() for e in node["errors"]]
    assert [e["extra_info"]["input_name"] for e in errors] == ["model"], errors
    assert "my_finetune.safetensors" in errors[0]["details"]


def test_no_traceback_and_no_thread_error_in_the_server_log(scenario):
    """No node fails in this scenario, so ComfyUI reports no node error either."""
    log = scenario["log"]
    assert stray_tracebacks(log) == [] and "!!! Exception during processing" not in log, log[-4000:]
