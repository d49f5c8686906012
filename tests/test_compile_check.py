"""The GPU compile check (tvr_kernels/compile_check.py), without a GPU.

Both tests run in a subprocess without ``TRITON_INTERPRET``: the interpreter replaces
``@triton.jit`` kernels by Python functions, which cannot be compiled.

* The probes show that the check catches what the interpreter lets through (a non-constexpr
  global, ``.to()`` on an int argument equal to 1, a loop-carried shape change, shared memory
  and grid over the device limits) and passes a sound kernel.
* The full check compiles every launch the ops make, at the test shapes and the papers'
  shapes, every dtype and seeds 0, 1, 2**32 + 7, for sm_80 and sm_90: no compile failure,
  shared memory and grids within the limits, no spills at the papers' shapes, and every
  ``*_kernel`` of ``tvr_kernels.triton`` launched by some case.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _can_compile() -> bool:
    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:  # triton < 3.4: no binder API to compile through
        return False
    return True


needs_binder = pytest.mark.skipif(not _can_compile(), reason="triton without the binder API")


@needs_binder
@pytest.mark.parametrize("arch", [90])
def test_probes_catch_what_the_interpreter_allows(arch):
    res = _run(["-m", "tests._compile_probes", str(arch)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert "Cannot access global variable" in r["plain_global"]["error"]
    assert "has no attribute 'to'" in r["int_arg_1"]["error"]
    assert r["int_arg_2"]["error"] == ""
    assert "Loop-carried variable" in r["loop_shape"]["error"]
    assert r["big_dot"]["error"] == "" and not r["big_dot"]["smem_ok"]
    assert r["big_grid"]["error"] == "" and not r["big_grid"]["grid_ok"]
    good = r["good"]
    assert good["error"] == "" and good["smem_ok"] and good["grid_ok"]
    assert good["regs"] > 0 and good["spills"] == 0
    assert not good["unguarded"] and r["big_grid"]["unguarded"]  # launched outside device_guard


@needs_binder
def test_every_launch_compiles_for_sm80_and_sm90():
    res = _run(["-m", "tvr_kernels.info", "--compile", "sm_80,sm_90"], timeout=1500)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-8000:]
    assert " 0 failed" in out and " 0 spill registers" in out, out[-8000:]
