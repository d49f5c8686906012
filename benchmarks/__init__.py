"""Benchmark suite: `python -m benchmarks` (the README's main job, `make bench`);
`python -m benchmarks.report` / `.plot` turn its records into the README's table and charts."""
