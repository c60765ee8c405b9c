"""Model names stay inside the model folders on every OS (issue #14, finding 6): the loaders' VALIDATE_INPUTS
makes ComfyUI skip its combo check, so our check is the only one between an API client and the disk."""
import inspect
import re
import sys

import pytest

from conftest import golden_path, import_pack
from src.models import locate
from src.models.download import ModelFileError, ensure_model

pack = import_pack()
nodes = pack.NODE_CLASS_MAPPINGS
model_folders = sys.modules["seedvr2_pack.nodes.model_folders"]

OUTSIDE = [
    "/etc/passwd", "/abs/seedvr2_ema_3b_fp16.safetensors",                # POSIX absolute
    "C:\\Windows\\win.ini", "C:/models/x.safetensors", "c:x.safetensors",  # drive letters (also relative)
    "\\\\server\\share\\x.safetensors", "//server/share/x.safetensors",    # UNC
    "\\x.safetensors",                                                     # rooted on the current drive
    "../x.safetensors", "..\\x.safetensors", "sub\\..\\..\\x.safetensors", "sub/../../x.safetensors",
    "x.safetensors:stream", "", "   ", "a\0b.safetensors",
]


@pytest.mark.parametrize("name", OUTSIDE)
def test_names_that_leave_the_folder_are_refused_in_both_flavours(name):
    assert locate.model_name_problem(name) is not None


@pytest.mark.parametrize("name", ["seedvr2_ema_3b_fp16.safetensors", "sub/my.safetensors", "sub\\my.gguf",
                                  "./x.safetensors", "a..b.safetensors", "dir.v2/x.pth"])
def test_names_inside_a_folder_are_accepted(name):
    assert locate.model_name_problem(name) is None


@pytest.fixture
def folder(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "seedvr2_ema_3b_fp16.safetensors").symlink_to(golden_path("dit3b_weights.safetensors"))
    (models / "sub" / "mine.safetensors").symlink_to(golden_path("dit3b_weights.safetensors"))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.safetensors").write_bytes(b"not yours")
    (models / "escape").symlink_to(secret, target_is_directory=True)
    monkeypatch.setattr(model_folders, "model_folders", lambda: [models])
    return models


def test_the_loaders_refuse_paths_outside_the_model_folders(folder):
    """The loaders' model names never reach outside the model folders.  ComfyUI's combo check refuses a name
    that is not listed (the loaders' VALIDATE_INPUTS does not take ``model``, so that check applies); a name
    that arrives through a link skips it and meets the same rule when the node runs (``model_problem``)."""
    secret = folder.parent / "secret" / "private.safetensors"
    for node, kind in (("SeedVR2LoadDiTModel", "dit"), ("SeedVR2LoadVAEModel", "vae")):
        assert "model" not in inspect.signature(nodes[node].VALIDATE_INPUTS).parameters
        for name in ("/etc/passwd", str(secret), "../secret/private.safetensors",
                     "..\\secret\\private.safetensors", "escape/../../secret/private.safetensors",
                     "C:\\secret\\private.safetensors", "\\\\host\\share\\private.safetensors"):
            message = model_folders.model_problem(name, kind)
            assert isinstance(message, str) and re.search(
                r"outside the model folders|steps out of its folder", message), (node, name, message)
        # A released name (downloadable) and a file inside the folder, Windows separators included.
        assert model_folders.model_problem("seedvr2_ema_3b_fp16.safetensors", kind) is None
        assert model_folders.model_problem("sub/mine.safetensors", kind) is None
        assert model_folders.model_problem("sub\\mine.safetensors", kind) is None


def test_a_missing_file_and_a_path_outside_give_the_same_answer_shape(folder):
    """An API client must not be able to tell whether a path exists outside the folders."""
    problem = model_folders.model_problem
    assert problem("/etc/passwd", "dit") == problem("/no/such/file", "dit").replace("/no/such/file", "/etc/passwd")


def test_the_load_itself_refuses_a_path(folder):
    errors = (sys.modules["seedvr2_pack.src.models.download"].ModelFileError,
              sys.modules["seedvr2_pack.src.pipeline.settings"].SettingsError)
    with pytest.raises(errors, match="outside the model folders"):
        nodes["SeedVR2LoadDiTModel"]().load(str(folder / "seedvr2_ema_3b_fp16.safetensors"), "cpu")
    (spec,) = nodes["SeedVR2LoadDiTModel"]().load("sub\\mine.safetensors", "cpu")
    assert spec.model.endswith("mine.safetensors")


def test_symlinks_inside_a_folder_are_the_users_and_are_followed(folder):
    """A link the user put into the model folder is followed (as ComfyUI does: weights linked from another
    disk); a name cannot reach outside through it with '..'."""
    assert locate.find_model_file("escape/private.safetensors", [folder]) == folder / "escape" / "private.safetensors"
    assert locate.find_model_file("escape/../../secret/private.safetensors", [folder]) is None
    assert locate.find_model_file("escape/..\\..\\secret/private.safetensors", [folder]) is None


def test_the_command_line_may_name_a_path_of_its_own(folder, tmp_path):
    target = tmp_path / "secret" / "mine.safetensors"
    target.symlink_to(golden_path("dit3b_weights.safetensors"))
    assert ensure_model(str(target), [folder], allow_paths=True) == target
    with pytest.raises(ModelFileError, match="outside the model folders"):
        ensure_model(str(target), [folder])
