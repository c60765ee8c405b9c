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
