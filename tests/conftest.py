"""Test set-up shared by every test module.

* Without a CUDA device, ``TRITON_INTERPRET=1`` is set here, before any Triton kernel module
  is imported (triton reads it when ``@triton.jit`` decorates), so ``use_backend("triton")``
  runs the Triton kernels on CPU tensors.
* ``slow`` tests run only with ``--runslow`` or ``TVR_RUNSLOW=1``.
"""
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tvr_kernels as tk  # noqa: E402
from tvr_kernels import _backend  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

# Devices and backends the fused ops can be tested on in this process.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fused_backends(device: str, supported=("cpp", "triton", "cuda")) -> list[str]:
    """The non-reference backends of an op that can run on ``device`` here."""
    out = []
    for b in supported:
        if _backend._why_unavailable(b) is not None:
            continue
        if b == "cpp" and device != "cpu":
            continue
        if b == "cuda" and device != "cuda":
            continue
        if b == "triton" and device == "cpu" and not _backend.triton_interpret():
            continue
        out.append(b)
    return out


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow sweeps")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("TVR_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow sweep: use --runslow or TVR_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def backend_ctx(name: str):
    return tk.use_backend(name)


# A NaN-poisoned empty: kernels that read memory they never wrote show up as NaN.
@pytest.fixture
def nan_poison(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread for the test: at tiny sizes more threads only add synchronisation,
    and on busy cores each parallel region waits for a descheduled thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
