"""Philox4x32-10 and the uniform/normal transforms in Triton, transcribed from
csrc/include/tvr/philox.h (same bits for the same seed and counter; tested).

Kernels that take the key words as arguments must list them in ``do_not_specialize``: Triton
specialises an int argument equal to 1 to a constexpr, which has no ``.to()``, so a seed whose
low or high word is 1 (seed 1, 2**32 + 7, ...) would not compile (the interpreter accepts it).
"""
import triton
import triton.language as tl


def split_seed(seed: int) -> tuple[int, int]:
    """The two 32-bit key words of a 64-bit seed, as kernel arguments."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


@triton.jit
def philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi):
    c0 = c0.to(tl.uint32)
    c1 = c1.to(tl.uint32)
    c2 = c2.to(tl.uint32)
    c3 = c3.to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        m1 = tl.full(c2.shape, 0xCD9E8D57, tl.uint32)
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + tl.full(k0.shape, 0x9E3779B9, tl.uint32)
        k1 = k1 + tl.full(k1.shape, 0xBB67AE85, tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def unit_float(x):
    """uint32 -> float32 in [0, 1) from the top 24 bits."""
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def unit_float_open0(x):
    """uint32 -> float32 in (0, 1]."""
    return ((x >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def box_muller(a, b):
    r = tl.sqrt(-2.0 * tl.log(unit_float_open0(a)))
    th = 6.283185307179586 * unit_float(b)
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _philox_test_kernel(c_ptr, out_ptr, n, seed_lo, seed_hi, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0 = tl.load(c_ptr + 4 * i, mask=m, other=0)
    c1 = tl.load(c_ptr + 4 * i + 1, mask=m, other=0)
    c2 = tl.load(c_ptr + 4 * i + 2, mask=m, other=0)
    c3 = tl.load(c_ptr + 4 * i + 3, mask=m, other=0)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    tl.store(out_ptr + 4 * i, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64), mask=m)


def philox(counters, seed: int):
    """Test hook: counters int64 ``[n, 4]`` (uint32 values) -> int64 ``[n, 4]`` outputs."""
    import torch

    from . import device_guard

    counters = counters.contiguous()
    out = torch.empty_like(counters)
    n = counters.shape[0]
    lo, hi = split_seed(seed)
    with device_guard(counters):
        _philox_test_kernel[(triton.cdiv(n, 128),)](counters, out, n, lo, hi, BLOCK=128)
    return out
