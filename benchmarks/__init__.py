"""Benchmark suite: `python -m benchmarks.run` (the README's main job, `make bench`)."""
