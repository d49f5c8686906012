"""Triton kernels, one module per op. Imported lazily by :mod:`tvr_kernels.ops` so that a
machine without triton can still use the other backends. Set ``TRITON_INTERPRET=1`` before
these modules are imported to run them on CPU tensors (how CI tests them).

Every launcher runs its launches under :func:`device_guard` of its input: Triton launches on
the *current* CUDA device and stream, so without the guard a tensor on ``cuda:1`` would be
read by a kernel running on ``cuda:0``.
"""
from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current (a no-op for CPU tensors)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
