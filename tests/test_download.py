"""Model registry, finding files in model folders, and downloading released files safely.

Downloads use a fake ``huggingface_hub.hf_hub_download`` that behaves like the real one with
``local_dir``: it writes ``local_dir/<filename>`` and keeps a partial download as
``local_dir/.cache/huggingface/download/<filename>.incomplete`` to resume from.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save

from conftest import golden_path
from src.models import download, file_types, locate, registry
from src.models.download import ModelFileError, ensure_model
from src.models.registry import ModelInfo

CONTENT = save({"vid_in.proj.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8),
                "blocks.0.attn.proj_qkv.vid.weight": torch.ones(4, 8)})
FILE = "seedvr2_tiny_test.safetensors"
INFO = ModelInfo(FILE, "example/SeedVR2-test", hashlib.sha256(CONTENT).hexdigest(), "dit", "3b", "fp16")


@pytest.fixture
def known_tiny(monkeypatch):
    """Make FILE a released file (registry lookups of other names are unchanged)."""
    real = download.known_model
    monkeypatch.setattr(download, "known_model", lambda name: INFO if name == FILE else real(name))


class FakeHub:
    """Stands in for hf_hub_download; ``plan`` says per call what happens: "ok", "corrupt", "offline",
    or "interrupt" (half the bytes land in the .incomplete file, then the connection drops)."""

    def __init__(self, monkeypatch, *plan):
        self.plan, self.calls, self.resumed_from = list(plan), [], []
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self)
        monkeypatch.setattr(download, "offline_reason", lambda info: None)  # the fake hub is always reachable

    def __call__(self, repo_id, filename, *, local_dir, **kwargs):
        self.calls.append({"repo_id": repo_id, "filename": filename, "local_dir": Path(local_dir)})
        action = self.plan.pop(0)
        if action == "offline":
            raise OSError("Network is unreachable")
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = partial.read_bytes() if partial.exists() else b""
        self.resumed_from.append(len(have))
        if action == "interrupt":
            partial.write_bytes(CONTENT[: len(CONTENT) // 2])
            raise ConnectionError("connection reset by peer")
        body = CONTENT if action == "ok" else CONTENT[:-1] + b"\x00"
        partial.write_bytes(have + body[len(have):])
        final = Path(local_dir) / filename
        os.replace(partial, final)
        (partial.parent / f"{filename}.metadata").write_text("commit\netag\n")
        return str(final)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_entries_are_complete_and_unique():
    names = [info.filename for info in registry.KNOWN_MODELS]
    assert len(names) == len(set(names)) == 11
    for info in registry.KNOWN_MODELS:
        assert re.fullmatch(r"[0-9a-f]{64}", info.sha256), info
        assert info.kind in ("dit", "vae") and file_types.has_model_extension(info.filename)
        assert (info.size in ("3b", "7b")) == (info.kind == "dit")
        assert info.size in info.filename or info.kind == "vae"
        assert info.sharp == ("sharp" in info.filename)
    assert registry.known_vae_models() == [registry.DEFAULT_VAE]
    assert registry.DEFAULT_DIT in registry.known_dit_models()
    assert len(registry.known_dit_models()) == 10


def test_registry_urls_point_at_the_hub_file():
    info = registry.known_model("seedvr2_ema_7b_fp16.safetensors")
    assert info.url == "https://huggingface.co/numz/SeedVR2_comfyUI/resolve/main/seedvr2_ema_7b_fp16.safetensors"
    assert registry.known_model("seedvr2_ema_3b-Q8_0.gguf").repo == "AInVFX/SeedVR2_comfyUI"
    assert registry.known_model("sub/seedvr2_ema_7b_fp16.safetensors") is None


# ---------------------------------------------------------------------------------------------- locate
def test_listing_recurses_filters_and_lets_the_first_folder_win(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for path in (first / "x.safetensors", first / "sub" / "y.gguf", second / "x.safetensors",
                 second / "z.pth", second / "notes.txt", second / ".seedvr2_download" / "w.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"1")
    files = locate.list_model_files([first, second, tmp_path / "missing"])
    assert files == {"sub/y.gguf": first / "sub" / "y.gguf", "x.safetensors": first / "x.safetensors",
                     "z.pth": second / "z.pth"}
    assert locate.find_model_file("z.pth", [first, second]) == second / "z.pth"
    assert locate.find_model_file(str(second / "z.pth"), [], allow_paths=True) == second / "z.pth"
    assert locate.find_model_file(str(second / "z.pth"), [second]) is None   # a path, not a name
    assert locate.find_model_file("../b/z.pth", [first]) is None
    assert locate.find_model_file("nothing.safetensors", [first, second]) is None


def test_file_kind_reads_the_tensor_names(tmp_path):
    (tmp_path / "renamed.safetensors").symlink_to(golden_path("vae_weights.safetensors"))
    (tmp_path / "my_dit.safetensors").symlink_to(golden_path("dit7b_weights.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "q.gguf").write_bytes(b"GGUF")
    (tmp_path / "my_vae.pth").write_bytes(b"PK")
    kinds = {p.name: locate.file_kind(p) for p in tmp_path.iterdir()}
    assert kinds == {"renamed.safetensors": "vae", "my_dit.safetensors": "dit", "broken.safetensors": "unknown",
                     "q.gguf": "dit", "my_vae.pth": "vae"}


def test_model_choices_put_released_files_first_and_sort_vaes_by_content(tmp_path):
    (tmp_path / "decoder.safetensors").symlink_to(golden_path("vae_weights.safetensors"))
    (tmp_path / "custom_7b.safetensors").symlink_to(golden_path("dit7b_weights.safetensors"))
    (tmp_path / "ema_vae_fp16.safetensors").symlink_to(golden_path("vae_weights.safetensors"))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "partial.safetensors").write_bytes(b"")
    files = locate.list_model_files([tmp_path]) | {".hidden/partial.safetensors": tmp_path / ".hidden" / "x"}
    assert locate.model_choices("vae", files) == ["ema_vae_fp16.safetensors", "decoder.safetensors"]
    assert locate.model_choices("dit", files) == registry.known_dit_models() + ["custom_7b.safetensors"]
    with pytest.raises(ValueError, match="kind"):
        locate.model_choices("text", files)


# ---------------------------------------------------------------------------------------------- download
def test_missing_released_file_is_downloaded_verified_and_renamed(tmp_path, monkeypatch, known_tiny):
    hub = FakeHub(monkeypatch, "ok")
    path = ensure_model(FILE, [tmp_path / "models", tmp_path / "other"])
    assert path == tmp_path / "models" / FILE and path.read_bytes() == CONTENT
    call = hub.calls[0]
    assert (call["repo_id"], call["filename"]) == (INFO.repo, FILE)
    assert call["local_dir"].parent == tmp_path / "models" and call["local_dir"].name.startswith(".")
    assert not call["local_dir"].exists(), "the staging folder is cleaned up"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [FILE]


def test_bad_hash_leaves_no_file_and_says_so(tmp_path, monkeypatch, known_tiny):
    FakeHub(monkeypatch, "corrupt")
    with pytest.raises(ModelFileError, match="SHA-256") as error:
        ensure_model(FILE, [tmp_path])
    assert not (tmp_path / FILE).exists()
    assert not list(tmp_path.rglob(f"{FILE}*")), "the rejected download is deleted"
    assert INFO.url in str(error.value)


def test_offline_gives_one_error_with_url_and_folder(tmp_path, monkeypatch, known_tiny):
    FakeHub(monkeypatch, "offline")
    with pytest.raises(ModelFileError) as error:
        ensure_model(FILE, [tmp_path / "models"])
    message = str(error.value)
    assert FILE in message and INFO.url in message and str(tmp_path / "models") in message
    assert "Network is unreachable" in message
    assert not (tmp_path / "models" / FILE).exists()


def test_interrupted_download_is_resumed_and_never_under_the_final_name(tmp_path, monkeypatch, known_tiny):
    hub = FakeHub(monkeypatch, "interrupt", "ok")
    with pytest.raises(ModelFileError, match="connection reset"):
        ensure_model(FILE, [tmp_path])
    assert not (tmp_path / FILE).exists()
    assert list(tmp_path.rglob(f"{FILE}.incomplete")), "the partial download is kept for resuming"
    assert ensure_model(FILE, [tmp_path]).read_bytes() == CONTENT
    assert hub.resumed_from == [0, len(CONTENT) // 2]


def test_present_file_is_used_without_hashing_or_network(tmp_path, monkeypatch, known_tiny):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / FILE).write_bytes(CONTENT)
    hub = FakeHub(monkeypatch)
    monkeypatch.setattr(download, "sha256_of", lambda path: pytest.fail("existing files must not be hashed"))
    assert ensure_model(FILE, [tmp_path / "a", tmp_path / "b"]) == tmp_path / "b" / FILE
    assert hub.calls == []


def test_truncated_released_file_is_downloaded_again(tmp_path, monkeypatch, known_tiny):
    (tmp_path / FILE).write_bytes(CONTENT[:-10])
    FakeHub(monkeypatch, "ok")
    assert ensure_model(FILE, [tmp_path]).read_bytes() == CONTENT


def test_truncated_unknown_file_is_a_clear_error(tmp_path):
    (tmp_path / "mine.safetensors").write_bytes(CONTENT[:-10])
    with pytest.raises(ModelFileError, match="truncated"):
        ensure_model("mine.safetensors", [tmp_path])
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        ensure_model("empty.gguf", [tmp_path])


def test_unknown_missing_file_names_the_folders_searched(tmp_path):
    with pytest.raises(ModelFileError) as error:
        ensure_model("my_finetune.safetensors", [tmp_path / "a", tmp_path / "b"])
    message = str(error.value)
    assert "my_finetune.safetensors" in message and str(tmp_path / "a") in message and str(tmp_path / "b") in message


def test_sha256_of_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert download.sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- several files, offline
RELEASED = (registry.DEFAULT_DIT, registry.DEFAULT_VAE)


def _no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("the hub must not be asked when the download cannot work")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_missing_file_is_named_at_once_with_its_address_and_absolute_destination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_hub(monkeypatch)
    with pytest.raises(ModelFileError) as error:
        download.find_models([(name, ["models/SEEDVR2"]) for name in RELEASED])
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    for name in RELEASED:
        assert f"{registry.known_model(name).url} -> {tmp_path / 'models' / 'SEEDVR2' / name}" in message


def test_a_mirror_in_hf_endpoint_is_the_address_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    with pytest.raises(ModelFileError, match=re.escape(f"https://mirror.example/numz/SeedVR2_comfyUI/resolve/main/"
                                                       f"{registry.DEFAULT_VAE}")):
        ensure_model(registry.DEFAULT_VAE, [tmp_path])


def test_a_refused_connection_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    _no_hub(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ModelFileError, match="2 released model file.* not reachable") as error:
        download.find_models([(name, [tmp_path]) for name in RELEASED])
    assert time.monotonic() - start < 2.0
    assert all(str(tmp_path / name) in str(error.value) for name in RELEASED)


def test_a_server_that_never_answers_is_given_up_on_at_the_deadline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "PROBE_SECONDS", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        reason = download.offline_reason(INFO)
        took = time.monotonic() - start
    assert reason is not None and "127.0.0.1" in reason
    assert took < 1.5


def test_any_http_answer_means_the_hub_is_reachable(monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert download.offline_reason(INFO) is None
    finally:
        server.shutdown()
        server.server_close()


def test_unusable_and_downloadable_files_are_reported_together_before_any_download(tmp_path, monkeypatch,
                                                                                   known_tiny):
    hub = FakeHub(monkeypatch)
    with pytest.raises(ModelFileError) as error:
        download.find_models([("my_finetune.safetensors", [tmp_path]), (FILE, [tmp_path])])
    message = str(error.value)
    assert "my_finetune.safetensors" in message and f"{INFO.url} -> {tmp_path / FILE}" in message
    assert hub.calls == []


def test_a_file_asked_for_twice_is_downloaded_once(tmp_path, monkeypatch, known_tiny):
    hub = FakeHub(monkeypatch, "ok")
    paths = download.find_models([(FILE, [tmp_path]), (FILE, [tmp_path])]).fetch()
    assert paths == [tmp_path / FILE] * 2 and len(hub.calls) == 1
