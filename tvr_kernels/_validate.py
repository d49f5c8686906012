"""Argument checks shared by every op. They run before any kernel, read shapes and Python
numbers only (never tensor data, so they trace under ``torch.compile(fullgraph=True)``), and
name the argument and what was expected."""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, *, ndim: int | Sequence[int] | None = None, shape_doc: str = "",
           dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """``x`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions (``shape_doc`` names
    the expected shape in the message, e.g. '[B*T, N, C]')."""
    expect = f" {shape_doc}" if shape_doc else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{expect}, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}{expect}, got shape {tuple(x.shape)}")
    if dtypes and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def integer(name: str, v, *, min_value: int | None = None, max_value: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {v}")
    if max_value is not None and v > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {v}")


def positive_finite(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {v}")


def choice(name: str, v, options: Sequence[str]) -> None:
    if v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")


def seed(name: str, v) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or None, got {type(v).__name__}")
    if not 0 <= v < 2 ** 63:
        raise ValueError(f"{name} must be in [0, 2**63), got {v}")
