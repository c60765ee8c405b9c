"""The timing report (src/pipeline/timing.py) and the wall section: real entry points in fresh processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import performance_test
from conftest import REPO_ROOT, golden_path
from src.benchmark import wall
from src.pipeline import timing


def test_a_disabled_timeline_records_nothing():
    line = timing.Timeline(None)
    with line.span("encode"):
        pass
    line.mark("first")
    line.add("write", 1.0)
    assert list(line.timed_iter([1, 2], "read")) == [1, 2]
    assert not line.enabled and line.spans == [] and line.marks == {} and line.totals == {}
    assert line.write() is None


def test_spans_marks_and_totals_are_seconds_since_the_process_started(tmp_path):
    line = timing.Timeline(tmp_path / "t.json")
    first = line.now()
    assert first > 0  # the interpreter ran before this
    with line.span("encode", file="x"):
        time.sleep(0.05)
    line.mark("first_output_frame")
    line.mark("first_output_frame")  # the first one is kept
    with line.accumulate("write"):
        time.sleep(0.01)
    with line.accumulate("write"):
        pass
    assert list(line.timed_iter(iter("ab"), "read")) == ["a", "b"]
    (span,) = line.spans
    assert span["name"] == "encode" and span["file"] == "x" and span["seconds"] >= 0.05
    assert first - 1e-3 <= span["start"] < span["end"] <= line.marks["first_output_frame"] + 1e-3  # rounded to 0.1 ms
    assert line.totals["write"] >= 0.01 and line.counts["write"] == 2 and line.counts["read"] == 3
    report = json.loads(line.write().read_text())
    assert report["marks"]["first_output_frame"] == line.marks["first_output_frame"]
    if os.path.exists("/proc/self/status"):
        assert report["memory"]["host_rss_peak_bytes"] >= report["memory"]["host_rss_bytes"] > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start time from /proc (Linux)")
def test_the_origin_is_the_process_start_not_the_import(tmp_path):
    code = ("import time; time.sleep(0.6); import sys; sys.path.insert(0, '.'); "
            "from src.pipeline import timing; timing.mark('imported')")
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60,
                   env={**os.environ, timing.ENV_VAR: str(out)})
    report = json.loads(out.read_text())  # written at exit by the atexit hook
    assert 0.6 <= report["marks"]["imported"] < 30
    assert report["marks"]["exit"] >= report["marks"]["imported"]


def test_breakdown_sums_spans_and_reads_marks():
    report = {"marks": {"cli_main": 1.5, "imports_done": 2.0, "first_output_frame": 9.0, "exit": 9.5},
              "spans": [{"name": "load_dit", "seconds": 1.25}, {"name": "encode", "seconds": 2.0},
                        {"name": "encode", "seconds": 0.5}],
              "totals": {"write": 0.75, "triton_compile": 3.0}}
    b = wall.breakdown(report, wall=10.0)
    assert b["startup_s"] == 1.5 and b["imports_s"] == 0.5 and b["load_dit_s"] == 1.25 and b["encode_s"] == 2.5
    assert b["write_total_s"] == 0.75 and b["triton_compile_total_s"] == 3.0
    assert b["first_output_frame_s"] == 9.0 and b["after_exit_hook_s"] == 0.5


def test_incumbent_model_folder_links_our_files_and_marks_them_validated(tmp_path):
    config = wall.WallConfig(root=tmp_path / "w", out=tmp_path / "o")
    folder = wall.models_dir(config)
    folder.mkdir(parents=True)
    dit, vae = folder / wall.DIT_FILES["3b"], folder / wall.VAE_FILE
    dit.write_bytes(b"d" * 10)
    vae.write_bytes(b"v" * 7)
    target = wall.prepare_incumbent_models(config, dit, vae)
    cache = json.loads((target / ".validation_cache.json").read_text())
    for source in (dit, vae):
        linked = target / source.name
        assert os.path.samefile(linked, source)  # removing the link would leave our file in place
        # The incumbent trusts an entry whose size matches and whose mtime is within 2 s.
        assert cache[source.name]["size"] == linked.stat().st_size
        assert abs(cache[source.name]["mtime"] - linked.stat().st_mtime) < 2


def test_cold_runs_start_with_empty_caches(tmp_path):
    config = wall.WallConfig(root=tmp_path, out=tmp_path / "o")
    env = wall.cache_env(config, cold=False)
    marker = os.path.join(env["TRITON_CACHE_DIR"], "kernel.bin")
    open(marker, "w").close()
    assert os.path.exists(os.path.join(wall.cache_env(config, cold=False)["TRITON_CACHE_DIR"], "kernel.bin"))
    cold = wall.cache_env(config, cold=True)
    assert set(cold) == set(wall.CACHE_VARIABLES) and os.listdir(cold["TRITON_CACHE_DIR"]) == []


def test_wall_section_runs_the_cli_and_the_node_in_fresh_processes(tmp_path):
    out = tmp_path / "results.json"
    code = performance_test.main([
        "--sections", "wall", "--device", "cpu", "--model", str(golden_path("dit3b_weights.safetensors")),
        "--vae", str(golden_path("vae_weights.safetensors")), "--test-frames", "5", "--input-size", "64x48",
        "--resolution", "64", "--long-frames", "9", "--wall-dir", str(tmp_path / "wall"),
        "--wall-runs", "cli_video_cold,node_warm,incumbent_video", "--incumbent", "", "--output", str(out)])
    assert code == 0
    runs = {run["name"]: run for run in json.loads(out.read_text())["wall"]["runs"]}
    cli, node = runs["cli_video_cold"], runs["node_warm"]
    assert runs["incumbent_video"]["skipped"].startswith("no incumbent")
    for run in (cli, node):
        assert run["returncode"] == 0 and run["output_exists"], open(run["log"]).read()[-2000:]
        b = run["breakdown"]
        assert 0 < b["startup_s"] < run["wall_s"] and b["after_exit_hook_s"] >= 0
        for phase in ("load_vae_s", "load_dit_s", "encode_s", "upscale_s", "decode_s"):
            assert b[phase] > 0, phase
    assert cli["breakdown"]["startup_s"] < cli["breakdown"]["first_output_frame_s"] <= cli["wall_s"]
    assert cli["breakdown"]["write_total_s"] > 0 and cli["memory"]["host_rss_peak_bytes"] > 0
    import av

    with av.open(cli["output"]) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (84, 64)
        assert sum(1 for _ in container.decode(stream)) == 5
    queues = node["queues"]
    assert [q["queue"] for q in queues] == [1, 2] and all(q["frames"] == 5 for q in queues)
    assert node["info"]["triton_imported_by_pack"] is False and node["info"]["cuda_initialised_by_pack"] is False
    # The second queue reuses the cached models: it loads nothing.
    spans = json.loads(open(node["log"].replace(".log", ".timing.json")).read())["spans"]
    queue2 = next(s for s in spans if s["name"] == "queue2")
    assert not [s for s in spans if s["name"].startswith("load_") and s["start"] >= queue2["start"]]


def test_the_cli_exits_with_its_status_and_writes_its_timeline_first(tmp_path):
    report = tmp_path / "t.json"
    child = subprocess.run([sys.executable, "inference_cli.py", str(tmp_path / "missing.mp4")], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, timing.ENV_VAR: str(report)})
    assert child.returncode == 2 and "error" in child.stderr
    marks = json.loads(report.read_text())["marks"]
    assert 0 < marks["cli_main"] <= marks["exit"]


def test_triton_compiles_cache_loads_and_autotuning_are_totalled(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip(f"triton {triton.__version__} has no compile hooks")
    line = timing.Timeline(tmp_path / "t.json")
    monkeypatch.setattr(timing, "TIMELINE", line)
    monkeypatch.setattr(timing, "_TRITON_WATCHED", False)
    seen = []
    for owner, name in ((knobs.runtime, "jit_cache_hook"), (knobs.runtime, "jit_post_compile_hook"),
                        (knobs.compilation, "listener"), (knobs.autotuning, "listener")):
        monkeypatch.setattr(owner, name, lambda name=name, **kw: seen.append(name))  # hooks set before ours
    timing.watch_triton()
    runtime = knobs.runtime
    assert runtime.jit_cache_hook(key=1) is None  # never asks Triton to skip the compile
    time.sleep(0.02)
    runtime.jit_post_compile_hook(key=1)  # compiled (no listener call said it came from the cache)
    runtime.jit_cache_hook(key=2)
    knobs.compilation.listener(cache_hit=True)
    runtime.jit_post_compile_hook(key=2)
    knobs.autotuning.listener(duration=1.5, cache_hit=False)
    knobs.autotuning.listener(duration=None, cache_hit=True)
    assert line.totals["triton_compile"] >= 0.02 and line.counts["triton_cache_load"] == 1
    assert line.totals["triton_autotune"] == 1.5 and line.counts["triton_autotune_cached"] == 1
    assert seen.count("jit_cache_hook") == 2 and seen.count("listener") == 3  # the earlier hooks still run
    assert line.info["triton_hooks"].startswith("triton ")
