"""pytest-benchmark entry: every ``small`` case of the suite (one per op and model stage, a
toy size), in each mode, for the eager reference and each fused backend that runs here.

    pytest benchmarks/ --benchmark-only [--benchmark-autosave]
    pytest benchmarks/ --benchmark-only --benchmark-compare     # against the last saved run

Timings are pytest-benchmark's (wall clock; CUDA calls are synchronised); the suite's own
figures (peak memory, torch.compile baselines, the papers' shapes) come from
``python -m benchmarks``.
"""
import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from benchmarks.common import make_step  # noqa: E402
from benchmarks.run import bench_modules, load_cases, providers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ("reference", "cpp", "triton", "cuda")
CASES = [c for m in bench_modules() for c in load_cases(m) if "small" in c.shapes]


# The suite's own provider list (what runs on this device), less compile and the baselines.
PARAMS = [pytest.param(c, mode, p, id=f"{c.op}[{c.name}]-{mode}-{p}")
          for c in CASES for mode in c.modes
          for p in providers(c, DEVICE, allow_compile=False) if p in PROVIDERS]


@pytest.mark.parametrize("case,mode,provider", PARAMS)
def test_small_case(benchmark, case, mode, provider):
    step, _ = make_step(case, mode, provider, DEVICE)
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.extra_info.update(op=case.op, case=case.name, mode=mode, provider=provider)
    benchmark(run)
