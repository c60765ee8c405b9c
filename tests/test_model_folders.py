"""The loader lists with ComfyUI's folders: models/SEEDVR2, diffusion_models (and its old name unet), vae,
and their extra_model_paths.yaml entries, through a fake ``folder_paths`` that behaves like ComfyUI's."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import golden_path, import_pack, load_golden
from src.models import registry
from src.models.download import ModelFileError, ensure_model
from tools import comfy_quantize as tool

import_pack()
model_folders = sys.modules["seedvr2_pack.nodes.model_folders"]


class FakeFolderPaths:
    """ComfyUI's folder_paths: a key -> (folders, extensions) table; "unet" is mapped to
    "diffusion_models" as ComfyUI's map_legacy does; file lists recurse and use "/" separators."""

    def __init__(self, root: Path, extra: dict[str, list[Path]]):
        self.models_dir = str(root / "models")
        self.folder_names_and_paths = {
            "diffusion_models": ([str(root / "models" / "unet"), str(root / "models" / "diffusion_models")], set()),
            "vae": ([str(root / "models" / "vae")], set()),
            "checkpoints": ([str(root / "models" / "checkpoints")], set()),
        }
        for key, folders in extra.items():  # what extra_model_paths.yaml adds
            self.folder_names_and_paths.setdefault(key, ([], set()))[0].extend(map(str, folders))

    @staticmethod
    def _key(key):
        return {"unet": "diffusion_models"}.get(key, key)

    def add_model_folder_path(self, name, path, is_default=False):
        self.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    def get_folder_paths(self, key):
        return list(self.folder_names_and_paths[self._key(key)][0])

    def get_filename_list(self, key):
        names = set()
        for folder in self.get_folder_paths(key):
            if Path(folder).is_dir():
                names |= {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}
        return sorted(names)

    def get_full_path(self, key, name):
        return next((str(Path(d) / name) for d in self.get_folder_paths(key) if (Path(d) / name).is_file()), None)


def _put(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def int8_dit():
    emb = load_golden("text_embeddings.safetensors")
    return tool.convert(load_golden("dit3b_weights.safetensors"), "int8_convrot", conditioning=(emb["pos"], emb["neg"]))[0]


@pytest.fixture
def comfy(tmp_path, monkeypatch, int8_dit):
    root, extra = tmp_path, tmp_path / "shared"
    fake = FakeFolderPaths(root, {"diffusion_models": [extra / "dm"], "vae": [extra / "vae"],
                                  "SeedVR2": [extra / "seedvr2"]})
    monkeypatch.setattr(model_folders, "folder_paths", fake)
    model_folders.register_model_folder()
    dit = int8_dit
    vae = load_golden("vae_weights.safetensors")
    models = root / "models"
    _put(models / "diffusion_models" / "seedvr2_3b_int8_convrot.safetensors", dit)
    _put(extra / "dm" / "sub" / "seedvr2_7b_fp16.safetensors",
         {k: v.half() for k, v in load_golden("dit7b_weights.safetensors").items()})
    _put(models / "diffusion_models" / "flux_like.safetensors",
         {"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8), "img_in.weight": torch.zeros(8, 4)})
    _put(models / "vae" / "ema_vae_fp16.safetensors", vae)
    (extra / "vae").mkdir(parents=True)
    (extra / "vae" / "seedvr2_ema_vae_fp16.safetensors").symlink_to(models / "vae" / "ema_vae_fp16.safetensors")
    _put(models / "vae" / "sdxl_vae.safetensors",      # an image VAE: encoder.* keys, 2-D convolutions
         {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3)})
    _put(models / "vae" / "dit_in_the_wrong_folder.safetensors", load_golden("dit3b_weights.safetensors"))
    (models / "SEEDVR2").mkdir(parents=True)
    (models / "SEEDVR2" / "seedvr2_ema_3b_fp16.safetensors").symlink_to(golden_path("dit3b_weights.safetensors"))
    return types.SimpleNamespace(root=root, models=models, extra=extra)


def test_folders_are_ours_first_then_comfyuis_without_duplicates(comfy):
    m, e = comfy.models, comfy.extra
    assert model_folders.model_folders() == [
        e / "seedvr2", m / "SEEDVR2", m / "unet", m / "diffusion_models", e / "dm", m / "vae", e / "vae"]


def test_dit_list_holds_seedvr2_dits_from_every_folder_and_nothing_else(comfy):
    choices = model_folders.dit_choices()
    released = registry.known_dit_models()
    assert choices[: len(released)] == released
    assert choices[len(released):] == ["seedvr2_3b_int8_convrot.safetensors", "sub/seedvr2_7b_fp16.safetensors"]
    assert "flux_like.safetensors" not in choices and "dit_in_the_wrong_folder.safetensors" not in choices


def test_vae_list_holds_the_seedvr2_vae_once(comfy):
    # The released name is found in models/vae; the extra folder's link to the same file is not listed again.
    assert model_folders.vae_choices() == ["ema_vae_fp16.safetensors"]


def test_comfy_files_resolve_where_they_are_without_downloading(comfy, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no download"))
    assert model_folders.fetch_model("seedvr2_3b_int8_convrot.safetensors") == \
        comfy.models / "diffusion_models" / "seedvr2_3b_int8_convrot.safetensors"
    assert model_folders.fetch_model("ema_vae_fp16.safetensors") == comfy.models / "vae" / "ema_vae_fp16.safetensors"
    assert model_folders.model_problem("sub/seedvr2_7b_fp16.safetensors", "dit") is None


def test_listed_comfy_file_loads_through_the_nodes(comfy, monkeypatch):
    pack = import_pack()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (spec,) = pack.nodes.dit_model_loader.SeedVR2LoadDiTModel().load(
        model="seedvr2_3b_int8_convrot.safetensors", device="cpu")
    assert spec.model == str(comfy.models / "diffusion_models" / "seedvr2_3b_int8_convrot.safetensors")


def test_released_files_without_a_known_hash_are_never_downloaded(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no download"))
    names = [info.filename for info in registry.PLACE_YOURSELF]
    assert {"seedvr2_3b_nvfp4.safetensors", "seedvr2_7b_sharp_int8_convrot.safetensors",
            "seedvr2_ema_vae_fp16.safetensors", "seedvr2_ema_3b.pth"} <= set(names)
    assert len(names) == len(set(names)) and not set(names) & {i.filename for i in registry.KNOWN_MODELS}
    assert all(info.sha256 == "" and registry.known_model(info.filename) is None for info in registry.PLACE_YOURSELF)
    with pytest.raises(ModelFileError, match=r"no SHA-256 of it is known.*huggingface.co/Comfy-Org/SeedVR2.*"
                                             r"models/diffusion_models"):
        ensure_model("seedvr2_7b_mxfp8.safetensors", [tmp_path])
