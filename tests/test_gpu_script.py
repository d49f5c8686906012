"""benchmarks/gpu.sh, the GPU machine's run: its dry run here (real python, no build, no kernel),
and its step logic (logs, fallback build, timeouts, exit status) with a stand-in python."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"

pytestmark = [
    pytest.mark.skipif(os.environ.get("TVR_GPU_SCRIPT") == "1",
                       reason="running inside benchmarks/gpu.sh, which dry-runs itself no further"),
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="needs bash and coreutils' timeout"),
]


def _run(*args, env=None, timeout=300):
    env = dict(os.environ if env is None else env)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_dry_run(tmp_path):
    out = tmp_path / "logs"
    res = _run("--dry-run", "--python", sys.executable, "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    for step in ["check python", "check files", "build (dry run", "info (dry run", "check collect",
                 "tests (dry run", "bench-token_shift (dry run", "bench-sinkhorn_knopp (dry run",
                 "== summary"]:
        assert step in text, step
    assert "pip install --no-index --no-build-isolation --no-deps -e ." in text
    assert "-m pytest -q tests" in text and " tests collected" in text
    assert "-m benchmarks --device cuda --shapes paper --min-time" in text
    assert f"--csv {out}/results.csv" in text
    assert "FAILED" not in text
    assert not out.exists(), "a dry run writes nothing"


def test_usage_errors():
    assert _run("--no-such-flag").returncode == 2
    assert _run("--python").returncode == 2
    assert _run("--budget", "5m").returncode == 2
    assert _run("--python", "/nonexistent/python3").returncode == 2
    res = _run("--help")
    assert res.returncode == 0 and "--dry-run" in res.stdout and "set -u" not in res.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: pip refuses, setup.py builds, the tests exit $FAKE_TEST_RC
case "$*" in
  *"-m pip"*) echo "error: externally-managed-environment"; exit 1 ;;
  *build_ext*) echo "built in place"; exit 0 ;;
  *bench_modules*) printf 'token_shift\\nsinkhorn_knopp\\n' ;;
  *"-m pytest"*) echo "pytest $*"; exit "${FAKE_TEST_RC:-0}" ;;
  *"-m benchmarks --"*) echo "bench $*" ;;
  *) echo "python $1" ;;
esac
"""


@pytest.mark.parametrize("test_rc", [0, 1])
def test_steps_with_stand_in_python(tmp_path, test_rc):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, FAKE_TEST_RC=str(test_rc), PATH=os.environ.get("PATH", ""))
    env.pop("TRITON_INTERPRET", None)
    res = _run("--python", str(fake), "--out", str(out), env=env, timeout=60)
    assert res.returncode == test_rc, res.stdout + res.stderr
    logs = sorted(p.name for p in out.iterdir())
    assert "summary.txt" in logs
    names = [n.split("-", 1)[1] for n in logs if n[:2].isdigit()]
    assert names[-6:] == ["build.log", "build-inplace.log", "info.log", "tests.log",
                          "bench-token_shift.log", "bench-sinkhorn_knopp.log"]
    summary = (out / "summary.txt").read_text()
    assert "failed, built in place instead" in summary
    assert ("FAILED (exit 1)" in summary) == (test_rc == 1)
    bench = (out / [n for n in logs if n.endswith("bench-token_shift.log")][0]).read_text()
    assert f"--csv {out}/results.csv" in bench and "--ops token_shift" in bench
