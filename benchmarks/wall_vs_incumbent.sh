#!/usr/bin/env bash
# What users wait for, ours against the incumbent in the same call: fresh processes of our CLI (clip -> 1080p
# mp4, image -> 4K png), our upscaler node driven as ComfyUI drives it (two queues), and the incumbent's CLI
# on the same random-weight files, clip and settings (3B fp16, 1080p, batch 33).
#
# On the GPU machine, from the repository root:   bash benchmarks/wall_vs_incumbent.sh [1|2|all|RUN,RUN,...] [ARGS]
# (ARGS go to performance_test.py; WHEELS=0 skips installing .whl/, e.g. where the packages are installed)
# Needs (not committed, see docs/performance.md "What users wait for"):
#   .whl/                 wheels missing there (diffusers, omegaconf, antlr4, rotary-embedding-torch, gguf, av, ...)
#   .bench/incumbent/     the incumbent's source: git archive of numz/ComfyUI-SeedVR2_VideoUpscaler HEAD
# Writes into $OUT (default /tmp/wall-out): wall_<part>.json (all numbers), wall_<part>.log (console) and
# wall_<part>_logs.tar.gz (each process's log and timing report; the upscaled files stay behind).
# Random weights, inputs and caches live in $WALL_DIR (default /tmp/seedvr2-wall), reused by later calls.
set -uo pipefail
PART=${1:-1}
shift $(( $# > 0 ? 1 : 0 ))
OUT=${OUT:-/tmp/wall-out}
WALL_DIR=${WALL_DIR:-/tmp/seedvr2-wall}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WALL_DIR"

if [ -d .whl ] && [ "${WHEELS:-1}" != 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${SEEDVR2_INCUMBENT_DIR:-}" ] && [ -f .bench/incumbent/inference_cli.py ]; then
    export SEEDVR2_INCUMBENT_DIR=$PWD/.bench/incumbent
fi

case "$PART" in
    # ~7-8 min on an H100: warm-up/cold, warm clip, incumbent clip, image at a new then a known size, incumbent
    # image, node with loading then cached.
    1) RUNS=cli_video_cold,cli_video_warm,incumbent_video,cli_video_warm,cli_image_warm,cli_image_warm,incumbent_image,node_warm ;;
    # ~6 min: a second cold sample (it fills the caches on a fresh machine), the 121-frame clip, fp8 settings
    # (the first of the two compiles the fp8 kernels), then checkpoint reading alone and the GPU tests.
    2) RUNS=cli_video_cold,cli_long_warm,cli_video_fp8_warm,cli_video_fp8_warm ;;
    # ~5 min: 7B (a 16 GB random file is written first), ours twice (the first compiles its shapes), incumbent.
    3) RUNS=cli_video_7b_warm,cli_video_7b_warm,incumbent_video_7b ;;
    all) RUNS=cli_video_cold,cli_video_warm,incumbent_video,cli_video_warm,cli_image_warm,cli_image_warm,incumbent_image,node_warm,cli_long_warm,cli_video_fp8_warm,cli_video_fp8_warm,cli_video_7b_warm,cli_video_7b_warm,incumbent_video_7b ;;
    *) RUNS=$PART; PART=custom ;;
esac

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>/dev/null
    echo "incumbent: ${SEEDVR2_INCUMBENT_DIR:-none}"
    echo "runs: $RUNS"
} 2>&1 | tee "$OUT/wall_$PART.log"

PYTHONUNBUFFERED=1 "$PYTHON" performance_test.py --sections wall --wall-runs "$RUNS" --wall-dir "$WALL_DIR" \
    --wall-out "$WALL_DIR/out_$PART" --wall-timeout 300 --verbose --output "$OUT/wall_$PART.json" "$@" 2>&1 \
    | tee -a "$OUT/wall_$PART.log"
status=${PIPESTATUS[0]}
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    # checkpoint reading alone: per tensor vs the staged reader (6.8 GB of fp16, converted to bf16 on the GPU)
    "$PYTHON" benchmarks/load_speed.py --gb 6.8 --dir "$WALL_DIR/load_speed" --output "$OUT/load_speed.json" 2>&1 \
        | tee -a "$OUT/wall_$PART.log"
    # the GPU tests of this work (the golden tiny models travel in .bench/golden when copied there)
    [ -d .bench/golden ] && export SEEDVR2_GOLDEN_DIR=$PWD/.bench/golden
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_staged_read.py tests/test_upscaler_prefetch.py \
        tests/test_stable_memory.py tests/test_startup.py "tests/test_attention_triton.py::test_autotuned_choice_is_loaded_from_disk_by_a_later_process" \
        "tests/test_attention_triton.py::test_autotuned_kernel_on_the_vae_head" 2>&1 | tail -25 | tee -a "$OUT/wall_$PART.log"
fi
tar -czf "$OUT/wall_${PART}_logs.tar.gz" -C "$WALL_DIR" --exclude='*.mp4' --exclude='*.png' "out_$PART" 2>/dev/null
exit "$status"
