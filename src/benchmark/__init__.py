"""Benchmark helpers behind performance_test.py: random full-size models, FLOP counts, timers."""
