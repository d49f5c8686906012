"""Philox4x32-10 in torch integer arithmetic: the transcription the references use to draw the
same bits as the C++/CUDA (csrc/include/tvr/philox.h) and Triton (triton/philox.py) kernels.

uint32 values live in int64 tensors; 32x32-bit products are split into 16-bit halves so no
intermediate leaves int64.
"""
from __future__ import annotations

import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
_INV_2_24 = 1.0 / (1 << 24)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ah, al = a >> 16, a & 0xFFFF
    hi_part, lo_part = ah * b, al * b  # each < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, seed: int) -> tuple[torch.Tensor, ...]:
    """Four uint32 outputs (as int64 tensors) for counters ``(c0, c1, c2, c3)`` (int64 tensors
    or ints holding uint32 values, broadcast together) and a 64-bit ``seed``."""
    cs = torch.broadcast_tensors(*[torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)])
    c0, c1, c2, c3 = (c & _MASK for c in cs)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1) from the top 24 bits (exact on every backend)."""
    return (x >> 8).to(torch.float32) * _INV_2_24


def unit_float_open0(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in (0, 1] (safe under log)."""
    return ((x >> 8) + 1).to(torch.float32) * _INV_2_24


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint32 streams -> two float32 standard-normal streams."""
    r = torch.sqrt(-2.0 * torch.log(unit_float_open0(a)))
    th = (2 * math.pi) * unit_float(b)
    return r * torch.cos(th), r * torch.sin(th)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 62-bit seed from torch's generator, so ``torch.manual_seed`` governs ops called
    with ``seed=None``."""
    return int(torch.randint(0, 2 ** 62, (), generator=generator, dtype=torch.int64).item())
