"""The command line end to end: a generated mp4 and a PNG upscaled with the tiny golden models."""
import av
import numpy as np
from PIL import Image

import inference_cli
from conftest import golden_path
from src.pipeline import media


def _write_mp4(path, frames=6, width=48, height=32):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
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
