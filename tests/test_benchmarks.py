"""The benchmark harness (benchmarks/): every suite module declares loadable cases, and one
worker measurement of a small case runs end to end for each kind of provider. The timings
themselves are never asserted (speed is checked by running the benchmarks, not by tests)."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, run  # noqa: E402


def test_every_suite_module_declares_cases():
    ops = set()
    for module in run.bench_modules():
        cases = run.load_cases(module)
        assert cases, module
        for case in cases:
            assert isinstance(case, common.Case)
            assert set(case.modes) <= set(common.MODES), (module, case.name)
            assert set(case.grad_args) or case.modes == ("fwd",), (module, case.name)
            ops.add(case.op)
    # Every op of the package is benchmarked.
    assert {"token_shift", "perturbed_topk", "isa", "bi_isa", "sinkhorn_knopp",
            "stochastic_max_similarity"} <= ops


# A small Bi-ISA measured by the real worker entry point, in its own process: the worker sets
# process-wide state (flush-to-zero for reference_ftz, glibc's mmap threshold).
_WORKER = """
import json, sys, torch
from benchmarks import common
import benchmarks.bench_isa as b
case = common.Case(op="bi_isa", name="tiny", make_inputs=b._bi_inputs(3, 2, L=5, P=7, D=16),
                   grad_args=b._BI_GRADS, warmup=1, min_reps=2, denormals=True)
mode, provider = sys.argv[1], sys.argv[2]
print("RESULT " + json.dumps(common.measure(case, mode, provider, "cpu", min_time=0.0)))
"""


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "bwd"])
@pytest.mark.parametrize("provider", ["reference", "reference_ftz", "cpp"])
def test_worker_measures_each_provider(mode, provider):
    if provider == "cpp":
        from tvr_kernels import _backend
        if _backend._why_unavailable("cpp") is not None:
            pytest.skip("C++ extension not built")
    res = subprocess.run([sys.executable, "-c", _WORKER, mode, provider], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**run.os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    r = json.loads(line[0][7:])
    assert r["reps"] >= 2 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert r["median_ms"] > 0 and r["peak_mb"] >= 0
