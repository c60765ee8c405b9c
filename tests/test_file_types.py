"""What a weight file is, by its name: the one table the folders, the readers and the loaders share."""
from __future__ import annotations

import pytest

from src.models import checkpoint, file_types, registry


@pytest.mark.parametrize("name, expected", [
    ("a.safetensors", "safetensors"), ("A.SafeTensors", "safetensors"), ("sub/dir/m.gguf", "gguf"),
    ("m.GGUF", "gguf"), ("m.pth", "pickle"), ("m.pt", "pickle"), ("m.ckpt", None), ("gguf", None),
    ("m.gguf.partial", None),
])
def test_the_suffix_names_the_format(name, expected):
    assert file_types.file_format(name) == expected
    assert file_types.has_model_extension(name) is (expected is not None)
    assert file_types.is_gguf(name) is (expected == "gguf")
    assert file_types.checked_from_header(name) is (expected in ("safetensors", "gguf"))


def test_every_released_file_has_a_format_we_read():
    for info in (*registry.KNOWN_MODELS, *registry.PLACE_YOURSELF):
        assert file_types.has_model_extension(info.filename), info.filename


def test_the_reader_refuses_any_other_suffix_and_lists_the_ones_it_reads(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match=r"'\.ckpt'.*\.safetensors.*\.gguf.*\.pth/\.pt"):
        checkpoint.read_index(path)
