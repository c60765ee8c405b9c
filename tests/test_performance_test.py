"""performance_test.py runs end to end on the CPU with the tiny models, and its optimized and plain runs agree."""
import json

import performance_test
from conftest import golden_path


def test_benchmark_runs_and_optimized_equals_plain_in_float32(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = performance_test.main([
        "--model", str(golden_path("dit3b_weights.safetensors")), "--vae", str(golden_path("vae_weights.safetensors")),
        "--test-frames", "5", "--input-size", "64x48", "--resolution", "64", "--iterations", "1",
        "--sections", "attention,e2e", "--variants", "plain,optimized", "--device", "cpu", "--output", str(out),
    ])
    assert code == 0
    results = json.loads(out.read_text())
    e2e = results["e2e"]
    assert e2e["output_size"] == [84, 64] and e2e["frames"] == 5
    for variant in ("plain", "optimized"):
        assert set(performance_test.PHASES) <= set(e2e[variant]) and e2e[variant]["gpu_seconds"] > 0
    # Every switch of the optimized path keeps the plain path's outputs (float32 on the CPU).
    assert e2e["optimized_vs_plain"]["rel_l2"] < 1e-4
    attention = results["attention"]["dit_windows"]
    assert attention["sdpa"]["available"] and attention["sdpa_math"]["rel_err_vs_plain"] < 1e-5
    assert "End-to-end" in capsys.readouterr().out


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class _Event:
    def __init__(self, name, start, end, cuda, own_us=0.0):
        import torch

        self.name, self.time_range, self.self_device_time_total = name, _Range(start, end), own_us
        self.device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU


def test_kernel_breakdown_assigns_kernels_to_the_innermost_phase():
    events = [
        _Event("phase:decode", 0, 1_000_000, cuda=False),
        _Event("phase:postprocess", 600_000, 900_000, cuda=False),
        _Event("conv", 10, 400_010, cuda=True),
        _Event("conv", 500_000, 550_000, cuda=True),
        _Event("lab", 700_000, 800_000, cuda=True),
        _Event("outside", 2_000_000, 2_000_100, cuda=True),
        _Event("aten::add", 20, 30, cuda=False),
        _Event("aten::conv", 5, 10, cuda=False, own_us=450_000),
    ]
    table = performance_test.kernel_breakdown(events, ("decode", "postprocess"))
    assert abs(table["decode"]["gpu_busy_s"] - 0.45) < 1e-9
    assert table["decode"]["top"][0]["name"] == "conv"
    assert abs(table["postprocess"]["gpu_busy_s"] - 0.1) < 1e-9
    assert [k["name"] for k in table["postprocess"]["top"]] == ["lab"]
    assert [k["name"] for k in table["decode"]["top_ops"]] == ["aten::conv"]


def test_profile_section_times_every_phase_of_the_real_job(tmp_path):
    out = tmp_path / "results.json"
    code = performance_test.main([
        "--model", str(golden_path("dit3b_weights.safetensors")), "--vae", str(golden_path("vae_weights.safetensors")),
        "--test-frames", "5", "--input-size", "64x48", "--resolution", "64",
        "--sections", "profile", "--device", "cpu", "--output", str(out),
    ])
    assert code == 0
    profile = json.loads(out.read_text())["profile"]
    assert set(profile) == set(performance_test.PHASES)
    assert profile["upscale"]["wall_s"] > 0 and profile["decode"]["wall_s"] > 0


def test_vae_norm_section_compares_compiled_kernels_with_group_norm(tmp_path):
    out = tmp_path / "results.json"
    code = performance_test.main(["--sections", "vae_norm", "--device", "cpu", "--input-size", "64x48",
                                  "--resolution", "64", "--output", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["vae_norm"]
    assert len(rows) == 3
    for row in rows.values():
        for variant in ("compiled_dynamic", "compiled_static"):
            assert row[variant]["rel_err"] < 1e-5 and row[variant]["seconds"] > 0
