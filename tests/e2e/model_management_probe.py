"""Run by test_comfyui_model_management.py with a ComfyUI checkout's interpreter (argv: ComfyUI dir, repo dir,
DiT file, VAE file): our models under ComfyUI's real model management; prints the figures as JSON."""
import gc
import json
import sys

sys.path[:0] = [sys.argv[1], sys.argv[2]]
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # as main.py --cpu
import comfy.model_management as comfy_mm  # noqa: E402  (before the pack: it looks for ComfyUI on import)
import torch  # noqa: E402

from src.pipeline import model_manager  # noqa: E402
from src.pipeline.settings import DiTSpec, VAESpec  # noqa: E402

manager = model_manager.ModelManager()
specs = {"dit": DiTSpec(model=sys.argv[3], device="cpu", cache_model=True),
         "dit_fp8": DiTSpec(model=sys.argv[3], device="cpu", cache_model=True, quantization="fp8_e4m3fn"),
         "vae": VAESpec(model=sys.argv[4], device="cpu", cache_model=True)}
figures = {}
for kind in list(specs):
    managed = manager.vae(specs[kind]) if kind == "vae" else manager.dit(specs[kind])
    managed.activate(memory_required=12345)
    tensors = [*managed.model.parameters(), *managed.model.buffers()]
    figures[kind] = {
        "parameter_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "model_size": managed.patcher.model_size(),
        "loaded_size": managed.patcher.loaded_size(),
        "patcher_class": type(managed.patcher).__name__,
        "registered": sum(m.model is managed.patcher for m in comfy_mm.current_loaded_models),
    }
    manager.finish(managed)  # the end of the run: cached, so kept
    del managed, tensors
    figures[kind]["cached_after_run"] = len(manager.cached())
    del specs[kind]  # ComfyUI dropped the loader's output
    gc.collect()
    figures[kind]["cached_after_release"] = len(manager.cached())
    figures[kind]["registered_after_release"] = len(comfy_mm.current_loaded_models)
print(json.dumps(figures))
