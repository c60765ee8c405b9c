"""What performance_test.py and the scripts in benchmarks/ share: timers (timer), the benchmark job and its
prebuilt models (job), results files (results), the kernel benchmarks' loop (kernels), random full-size
models (random_weights), FLOP counts (flops), and the wall-time runs of the real entry points (wall,
node_run)."""
