"""The command line end to end: a generated mp4 and a PNG upscaled with the tiny golden models; the help
text, and every failure as one error line with its exit status (in fresh processes where it matters)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import inference_cli
from conftest import golden_path
from src.models import registry
from src.options import ATTENTION_MODES, COLOR_CORRECTIONS, QUANTIZATION_MODES, VAE_QUANTIZATIONS
from src.pipeline import media


def _write_mp4(path, frames=6, width=48, height=32, rate=8):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            y, x = np.mgrid[0:height, 0:width]
            frame = np.stack([(x * 5 + i * 9) % 256, (y * 7) % 256, np.full_like(x, 128)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _models():
    return ["--dit_model", str(golden_path("dit3b_weights.safetensors")),
            "--vae_model", str(golden_path("vae_weights.safetensors")), "--device", "cpu"]


def test_video_in_mp4_out_streamed_in_chunks(tmp_path):
    source, target = tmp_path / "clip.mp4", tmp_path / "out.mp4"
    _write_mp4(source)
    code = inference_cli.main([str(source), "--output", str(target), "--resolution", "48", "--batch_size", "5",
                               "--chunk_size", "4", "--temporal_overlap", "1", *_models()])
    assert code == 0
    info = media.probe(target)
    assert (info.frames or sum(1 for _ in media.iter_chunks(target, 0))) and (info.width, info.height) == (72, 48)
    frames = next(media.iter_chunks(target, 0))
    assert frames.shape == (6, 48, 72, 3)


def test_png_in_png_out(tmp_path):
    source, target = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)).save(source)
    assert inference_cli.main([str(source), "--output", str(target), "--resolution", "32", "--batch_size", "1",
                               *_models()]) == 0
    assert Image.open(target).size == (52, 32)


def test_png_sequence_folder_to_png_frames(tmp_path):
    folder = tmp_path / "seq"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i:03d}.png")
    out = tmp_path / "frames"
    assert inference_cli.main([str(folder), "--output", str(out), "--output_format", "png", "--resolution", "32",
                               "--batch_size", "5", *_models()]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_bad_input_gives_a_clear_error(tmp_path, caplog):
    assert inference_cli.main([str(tmp_path / "missing.mp4"), *_models()]) == 2
    assert "no such file" in caplog.text


def test_fp8_vae_without_optimizations_is_refused_clearly(tmp_path, caplog):
    source = tmp_path / "clip.mp4"
    _write_mp4(source, frames=2)
    argv = [str(source), *_models(), "--vae_quantization", "fp8_e4m3fn", "--no_optimizations"]
    assert inference_cli.main(argv) == 2
    assert "enable_optimizations" in caplog.text and not (tmp_path / "clip_seedvr2.mp4").exists()


def test_png_through_the_fp8_vae(tmp_path):
    source = tmp_path / "image.png"
    Image.fromarray(np.full((32, 48, 3), 90, dtype=np.uint8)).save(source)
    argv = [str(source), *_models(), "--resolution", "64", "--vae_quantization", "fp8_e4m3fn",
            "--output", str(tmp_path / "out.png")]
    assert inference_cli.main(argv) == 0
    assert Image.open(tmp_path / "out.png").size == (96, 64)


# ------------------------------------------------------------------------------ help, errors, exit status
CLI = Path(inference_cli.__file__).resolve()
HEAVY_MODULES = {"torch", "numpy", "av", "PIL", "huggingface_hub", "safetensors", "tqdm", "triton"}


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(changes)
    return env


def _cli(args, *, cwd, env=None, setup: str = "", importtime: bool = False):
    """Run the CLI in a fresh interpreter; ``setup`` is Python run first (to inject a failure)."""
    if setup:
        code = (f"import sys; sys.path.insert(0, {str(CLI.parent)!r})\n{setup}\n"
                f"import runpy; sys.argv = [{str(CLI)!r}, *{list(map(str, args))!r}]\n"
                f"runpy.run_path({str(CLI)!r}, run_name='__main__')")
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, *(["-X", "importtime"] if importtime else []), str(CLI), *map(str, args)]
    start = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - start


def _messages(stderr: str) -> list[str]:
    """stderr without -X importtime's lines."""
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


def _imported(stderr: str) -> set[str]:
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.split("|")[-1].strip().split(".")[0] for line in lines}


def _image(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(path)
    return path


def test_help_lists_every_choice_and_imports_nothing_heavy(tmp_path):
    done, _seconds = _cli(["--help"], cwd=tmp_path, importtime=True)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for choice in (*ATTENTION_MODES, *QUANTIZATION_MODES, *COLOR_CORRECTIONS, *VAE_QUANTIZATIONS):
        assert choice in text, choice
    for info in registry.KNOWN_MODELS:
        assert info.filename in done.stdout and info.repo in done.stdout
    assert "examples:" in done.stdout and "python inference_cli.py clip.mp4" in done.stdout
    assert _imported(done.stderr) & HEAVY_MODULES == set()


def test_every_option_says_what_it_does_its_choices_and_its_default():
    parser = inference_cli.build_parser()
    formatter = parser.formatter_class("inference_cli.py")
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 30
    shown = {a.dest: formatter._expand_help(a) for a in options}  # the text --help prints for each option
    for action in options:
        assert len(action.help) > 15, action.dest
        assert "(default" in shown[action.dest], action.dest
        for choice in action.choices or ():
            assert choice in action.help, (action.dest, choice)
    assert shown["color_correction"].endswith("(default: lab)") and shown["debug"].endswith("(default: off)")
    assert shown["dit_model"].endswith(f"(default: {registry.DEFAULT_DIT})")


def test_missing_models_offline_are_all_named_in_one_line_before_torch_is_imported(tmp_path):
    done, seconds = _cli([_image(tmp_path)], cwd=tmp_path, env=_env(HF_HUB_OFFLINE="1"), importtime=True)
    lines = _messages(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for name in (registry.DEFAULT_DIT, registry.DEFAULT_VAE):
        folder = tmp_path / "models" / "SEEDVR2"
        assert f"{registry.known_model(name).url} -> {folder / name}" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]
    assert "torch" not in _imported(done.stderr)
    assert seconds < 5


def test_an_unreachable_hub_fails_within_seconds_with_one_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    done, seconds = _cli([_image(tmp_path), "--model_dir", "weights"], cwd=tmp_path,
                         env=_env(HF_ENDPOINT=f"http://127.0.0.1:{closed}"))
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "not reachable" in lines[0], done.stderr[-2000:]
    for name in (registry.DEFAULT_DIT, registry.DEFAULT_VAE):
        assert str(tmp_path / "weights" / name) in lines[0] and f"127.0.0.1:{closed}/" in lines[0]
    assert seconds < 5


def test_a_model_given_as_a_relative_path_is_looked_up_next_to_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert inference_cli.model_request("../w/x.safetensors", "models") == ("x.safetensors", [tmp_path.parent / "w"])
    assert inference_cli.model_request("x.safetensors", "models") == ("x.safetensors", [tmp_path / "models"])


FAILURES = {
    "out_of_memory": ("raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                      "total capacity of 79.19 GiB of which 1.25 GiB is free. Including non-PyTorch memory, this "
                      "process has 77.9 GiB memory in use.\\nOf the allocated memory 70 GiB is allocated by "
                      "PyTorch.')", "error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB."),
    "disk_full": ("raise OSError(errno.ENOSPC, 'No space left on device', 'out.png')",
                  "error: OSError: [Errno 28] No space left on device: 'out.png'"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failure_while_running_is_one_error_line_and_exit_1(tmp_path, failure):
    raise_it, expected = FAILURES[failure]
    setup = ("import errno, torch, src.pipeline.upscaler as upscaler\n"
             "def failing(*args, **kwargs):\n"
             f"    {raise_it}\n"
             "    yield\n"
             "upscaler.upscale_stream = failing")
    done, _seconds = _cli([_image(tmp_path), "--output", tmp_path / "out.png", *_models()], cwd=tmp_path, setup=setup)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and errors[0].startswith(expected), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    if failure == "out_of_memory":
        assert "--blocks_to_swap" in errors[0] and "Of the allocated memory" not in errors[0]


def test_ctrl_c_exits_130_with_a_short_message(tmp_path):
    setup = ("import time, src.pipeline.upscaler as upscaler\n"
             "def slow(*args, **kwargs):\n"
             "    sys.stderr.write('working\\n'); sys.stderr.flush(); time.sleep(120)\n"
             "    yield\n"
             "upscaler.upscale_stream = slow")
    code = (f"import sys; sys.path.insert(0, {str(CLI.parent)!r})\n{setup}\nimport runpy\n"
            f"sys.argv = [{str(CLI)!r}, {str(_image(tmp_path))!r}, *{[str(a) for a in _models()]!r}]\n"
            f"runpy.run_path({str(CLI)!r}, run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(), stderr=subprocess.PIPE,
                               text=True)
    try:
        for line in process.stderr:
            if line.strip() == "working":
                break
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
    assert rest.strip().splitlines()[-1] == "error: interrupted." and "Traceback" not in rest


def test_an_unexpected_error_is_one_line_and_debug_adds_the_traceback(tmp_path, monkeypatch, capsys):
    from src.pipeline import upscaler

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
        yield

    monkeypatch.setattr(upscaler, "upscale_stream", broken)
    argv = [str(_image(tmp_path)), "--output", str(tmp_path / "out.png"), *_models()]
    assert inference_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: RuntimeError: boom second line (run with --debug for the full "
                                            "traceback)")
    assert "Traceback" not in err
    assert inference_cli.main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and ", in broken" in err
    assert err.strip().splitlines()[-1] == "error: RuntimeError: boom second line"


def test_a_bad_device_name_is_refused_before_any_work(tmp_path, capsys):
    assert inference_cli.main([str(_image(tmp_path)), *_models(), "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: 'gpu0' is not a device") and len(err.splitlines()) == 1
    assert not (tmp_path / "in_seedvr2.png").exists()


def test_an_empty_folder_is_a_clear_input_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert inference_cli.main([str(tmp_path / "empty"), *_models()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no images found" in err and len(err.splitlines()) == 1


def test_a_bad_argument_is_one_error_line_too(capsys):
    with pytest.raises(SystemExit) as exited:
        inference_cli.main(["clip.mp4", "--attention_mode", "fastest"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: argument --attention_mode: invalid choice: 'fastest'") and "--help" in err


def test_settings_are_checked_before_anything_is_downloaded(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from src.models import download

    monkeypatch.setattr(download, "offline_reason", lambda info: None)  # the hub would be reachable
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: pytest.fail("a bad setting must be reported before a download"))
    argv = [str(_image(tmp_path)), "--model_dir", str(tmp_path / "models"), "--resolution", "8"]
    assert inference_cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: resolution must be at least 16")
