"""Triton kernels, one module per op. Imported lazily by :mod:`tvr_kernels.ops` so that a
machine without triton can still use the other backends. Set ``TRITON_INTERPRET=1`` before
these modules are imported to run them on CPU tensors (how CI tests them).

Every launcher runs its launches under :func:`device_guard` of its input: Triton launches on
the *current* CUDA device and stream, so without the guard a tensor on ``cuda:1`` would be
read by a kernel running on ``cuda:0``. The compile check (``tvr_kernels.compile_check``)
records every launch and fails any made outside a guard.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_guards = threading.local()


def inside_device_guard() -> bool:
    """True while the calling thread is inside :func:`device_guard`."""
    return getattr(_guards, "depth", 0) > 0


@contextlib.contextmanager
def device_guard(t: torch.Tensor) -> Iterator[None]:
    """Make ``t``'s CUDA device current for the block (nothing to switch for CPU tensors)."""
    _guards.depth = getattr(_guards, "depth", 0) + 1
    try:
        if t.device.type == "cuda":
            with torch.cuda.device(t.device):
                yield
        else:
            yield
    finally:
        _guards.depth -= 1
