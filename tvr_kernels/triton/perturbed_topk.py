"""Perturbed top-K (SPEC 2) in Triton.

Forward: one program per row; it walks the samples in blocks of ``BLOCK_S``. A block's noise
is drawn in-kernel (one Philox call per 4 indices, the keying of
csrc/include/tvr/perturbed_topk.h) or loaded from an injected ``noise`` tensor; the top-k of
``scores + z * sigma`` is found by k rounds of max + smallest index attaining it (the C++
kernel's tie rule); the chosen indices' ascending rank is a cumsum of the chosen mask, and
the block adds its one-hot counts and ``g(z)`` sums into ``[K_PAD, BLOCK_D]`` accumulators.
One program owns a row, so the result does not depend on scheduling (no atomics).

Backward: ``grad_scores = sum_j grad * (W / S / sigma)`` from the ``W`` the forward returned,
on a 1-D grid of (row, column block) programs. The full estimator's backward
(``gradient="full"``) is the forward's sample walk again (``_select_block``, same noise, same
selections) with ``sum_s g(z) * grad-at-the-selection`` accumulated instead of counts.

Compiled for sm_80 and sm_90 (triton 3.7.1, ``ptxas -v``) at the papers' shapes ([192, 49] and
[192, 196], k = 3, S = 500; seeded normal/Gumbel, injected noise, hard; float32/16, bfloat16,
float64): soft forward 118-221 registers (float64 seeded the most), hard 21-33, no spills, at
most 4 KiB of shared memory; backward 26-40 registers.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from . import device_guard
from .philox import box_muller, philox4x32_10, split_seed

# TVR_PTOPK_STREAM of csrc/include/tvr/perturbed_topk.h. A global read inside @triton.jit must
# be a tl.constexpr instance (a plain int, or an annotation `x: tl.constexpr = ...`, is a
# NameError when compiled; the interpreter accepts both).
_STREAM = tl.constexpr(0x544F504B)


@triton.jit
def _unit_float_open01(x):
    """uint32 -> float32 strictly inside (0, 1) (perturbed_topk.h: unit_float_open01)."""
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _gumbel(x):
    return -tl.log(-tl.log(_unit_float_open01(x)))


@triton.jit
def _noise_block(seed_lo, seed_hi, row, s, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
                 GUMBEL: tl.constexpr):
    """Noise ``[BLOCK_S, 4 * BLOCK_Q]`` of samples ``s`` (``[BLOCK_S]``) of ``row``: column
    ``4q + m`` is lane m of the Philox call with counter ``(q, s, row, STREAM)``."""
    q = tl.arange(0, BLOCK_Q)
    zero = tl.zeros((BLOCK_S, BLOCK_Q), dtype=tl.uint32)
    c0 = zero + q[None, :].to(tl.uint32)
    c1 = zero + s[:, None].to(tl.uint32)
    c2 = zero + row.to(tl.uint32)
    c3 = zero + _STREAM
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    if GUMBEL:
        z0, z1, z2, z3 = _gumbel(r0), _gumbel(r1), _gumbel(r2), _gumbel(r3)
    else:
        z0, z1 = box_muller(r0, r1)
        z2, z3 = box_muller(r2, r3)
    # interleave(interleave(z0, z2), interleave(z1, z3)) = [z0, z1, z2, z3] per group q, i.e.
    # column 4q + m holds lane m. (join + reshape gives the same tile, but the interpreter
    # then mis-broadcasts it with [:, None, :]; interleave is right on both.)
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def _select_block(sc, noise_ptr, row64, row, s0, d, k, S, sigma, seed_lo, seed_hi,
                  HAS_NOISE: tl.constexpr, GUMBEL: tl.constexpr, HARD: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Samples ``s0 .. s0 + BLOCK_S`` of ``row`` (scores ``sc`` ``[BLOCK_D]`` in ACC): their
    noise ``z``, the chosen mask ``sel`` (padding samples and indices never chosen) and each
    index's ``rank`` among the chosen in ascending index order, all ``[BLOCK_S, BLOCK_D]``.
    Forward and full backward both select through here, so they agree."""
    BLOCK_D: tl.constexpr = 4 * BLOCK_Q
    i = tl.arange(0, BLOCK_D)
    valid_i = i < d
    s = s0 + tl.arange(0, BLOCK_S)
    valid_s = s < S
    if HARD:
        z = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        p = sc[None, :] + z.to(ACC)
    else:
        if HAS_NOISE:
            offs = (row64 * S + s[:, None]) * d + i[None, :]
            z = tl.load(noise_ptr + offs, mask=valid_s[:, None] & valid_i[None, :], other=0.0)
        else:
            z = _noise_block(seed_lo, seed_hi, row, s, BLOCK_S, BLOCK_Q, GUMBEL)
        # float32 z * sigma first, then the sum in ACC: the authors' rounding.
        p = sc[None, :] + (z * sigma).to(ACC)
    ok = valid_i[None, :] & valid_s[:, None]
    # All False, with the [BLOCK_S, BLOCK_D] shape of every later round: a compiled loop
    # keeps a loop-carried value's shape.
    sel = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.int1)
    for _ in range(k):
        avail = ok & (~sel)
        m = tl.max(tl.where(avail, p, float("-inf")), axis=1)
        cand = tl.where(avail & (p == m[:, None]), i[None, :], BLOCK_D)
        first = tl.min(cand, axis=1)  # smallest index among equal maxima
        sel = sel | (i[None, :] == first[:, None])
    sel = sel & ok
    rank = tl.cumsum(sel.to(tl.int32), axis=1) - 1  # ascending index order
    return z, sel, rank


@triton.jit
def _load_row(scores_ptr, d, ACC: tl.constexpr, BLOCK_Q: tl.constexpr):
    """This program's row: its index (int32 and int64), the ``4 * BLOCK_Q`` column indices,
    their validity, and the scores in ACC (padding 0, never chosen)."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    i = tl.arange(0, 4 * BLOCK_Q)
    valid_i = i < d
    sc = tl.load(scores_ptr + row64 * d + i, mask=valid_i, other=0.0).to(ACC)
    return row, row64, i, valid_i, sc


@triton.jit
def _noise_grad(z, GUMBEL: tl.constexpr):
    """g(z), the estimator's weight: z (normal) or 1 - exp(-z) (Gumbel)."""
    if GUMBEL:
        return 1.0 - tl.exp(-z)
    else:
        return z


# The seed words are plain ints: one equal to 1 would be specialised to a constexpr (no .to()).
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _perturbed_topk_fwd_kernel(scores_ptr, noise_ptr, ind_ptr, w_ptr, d, k, S, sigma,
                               seed_lo, seed_hi, HAS_NOISE: tl.constexpr, GUMBEL: tl.constexpr,
                               HARD: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                               BLOCK_Q: tl.constexpr, K_PAD: tl.constexpr):
    BLOCK_D: tl.constexpr = 4 * BLOCK_Q
    row, row64, i, valid_i, sc = _load_row(scores_ptr, d, ACC, BLOCK_Q)
    j = tl.arange(0, K_PAD)
    counts = tl.zeros((K_PAD, BLOCK_D), dtype=tl.int32)
    wacc = tl.zeros((K_PAD, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        z, sel, rank = _select_block(sc, noise_ptr, row64, row, s0, d, k, S, sigma, seed_lo,
                                     seed_hi, HAS_NOISE, GUMBEL, HARD, ACC, BLOCK_S, BLOCK_Q)
        hit = sel[:, None, :] & (rank[:, None, :] == j[None, :, None])  # [BLOCK_S, K_PAD, BLOCK_D]
        counts += tl.sum(hit.to(tl.int32), axis=0)
        wacc += tl.sum(tl.where(hit, _noise_grad(z, GUMBEL)[:, None, :], 0.0), axis=0)
    out_offs = (row64 * k + j[:, None]) * d + i[None, :]
    out_mask = (j[:, None] < k) & valid_i[None, :]
    # zeros + S rather than S.to(): an int argument equal to 1 arrives as a constexpr.
    ind = tl.math.div_rn(counts.to(tl.float32), tl.zeros_like(wacc) + S)
    tl.store(ind_ptr + out_offs, ind, mask=out_mask)
    tl.store(w_ptr + out_offs, wacc, mask=out_mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _perturbed_topk_full_bwd_kernel(g_ptr, scores_ptr, noise_ptr, out_ptr, d, k, S, sigma,
                                    seed_lo, seed_hi, HAS_NOISE: tl.constexpr,
                                    GUMBEL: tl.constexpr, ACC: tl.constexpr,
                                    BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The full estimator contracted with grad: one program per row walks the forward's
    samples again, ``c[s] = sum_j grad[j, idx[s, j]]`` from the selection, and accumulates
    ``sum_s g(z[s, :]) * c[s]``; out ``= acc / S / sigma``."""
    BLOCK_D: tl.constexpr = 4 * BLOCK_Q
    row, row64, i, valid_i, sc = _load_row(scores_ptr, d, ACC, BLOCK_Q)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        z, sel, rank = _select_block(sc, noise_ptr, row64, row, s0, d, k, S, sigma, seed_lo,
                                     seed_hi, HAS_NOISE, GUMBEL, False, ACC, BLOCK_S, BLOCK_Q)
        # grad[rank, i] where chosen: a gather from the row's k*d gradients (cache-resident)
        # rather than a [BLOCK_S, K_PAD, BLOCK_D] one-hot tile, which spilled on sm_90.
        gsel = tl.load(g_ptr + (row64 * k + rank) * d + i[None, :], mask=sel, other=0.0)
        c = tl.sum(gsel, axis=1)  # [BLOCK_S]; 0 for padding samples (nothing chosen)
        acc += tl.sum(_noise_grad(z, GUMBEL) * c[:, None], axis=0)
    ones = tl.zeros_like(acc)
    out = tl.math.div_rn(tl.math.div_rn(acc, ones + S), ones + sigma)
    tl.store(out_ptr + row64 * d + i, out, mask=valid_i)


@triton.jit
def _perturbed_topk_bwd_kernel(g_ptr, w_ptr, out_ptr, d, k, S, sigma, n_blocks,
                               BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    # A 1-D grid of b * n_blocks programs: grid axis 1 stops at 65535 blocks, which a long
    # row (d > 65535 * BLOCK_D) would pass.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    i = (pid % n_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, K_PAD)
    offs = (row * k + j[:, None]) * d + i[None, :]
    mask = (j[:, None] < k) & (i[None, :] < d)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    ones = tl.zeros_like(w)
    e = tl.math.div_rn(tl.math.div_rn(w, ones + S), ones + sigma)
    tl.store(out_ptr + row * d + i, tl.sum(g * e, axis=0), mask=i < d)


def _sample_block(S: int, block_d: int, k_pad: int) -> int:
    if triton_interpret():  # each loop trip costs interpreter time: few, large blocks
        return max(1, min(triton.next_power_of_2(S), 65536 // (k_pad * block_d)))
    return max(1, min(triton.next_power_of_2(S), 64, 8192 // (k_pad * block_d)))


def perturbed_topk_fwd(scores: torch.Tensor, k: int, num_samples: int, sigma: float,
                       noise: torch.Tensor | None, seed: int, gumbel: bool, hard: bool):
    """scores ``[b, d]`` -> (indicators, W), both float32 ``[b, k, d]`` (see ops module)."""
    scores = scores.contiguous()
    b, d = scores.shape
    ind = torch.empty((b, k, d), device=scores.device, dtype=torch.float32)
    w = torch.empty_like(ind)
    if b == 0:
        return ind, w
    S = 1 if hard else num_samples
    has_noise = noise is not None and not hard
    noise_arg = noise.contiguous() if has_noise else ind  # unused pointer when no noise
    with device_guard(scores):
        _perturbed_topk_fwd_kernel[(b,)](
            scores, noise_arg, ind, w, d, k, S, sigma, HAS_NOISE=has_noise, GUMBEL=gumbel,
            HARD=hard, K_PAD=triton.next_power_of_2(k),
            **_launch_config(scores, triton.next_power_of_2(k), S, seed))
    return ind, w


def _launch_config(scores: torch.Tensor, k_pad: int, S: int, seed: int):
    """Launch arguments the forward and the full backward share (``k_pad``: the width of the
    per-sample one-hot the sample block must leave room for)."""
    d = scores.shape[1]
    block_q = triton.next_power_of_2((d + 3) // 4)
    lo, hi = split_seed(seed)
    return dict(seed_lo=lo, seed_hi=hi, ACC=tl.float64 if scores.dtype == torch.float64 else tl.float32,
                BLOCK_S=_sample_block(S, 4 * block_q, k_pad), BLOCK_Q=block_q,
                # No fused multiply-add: the GPU compiler would turn scores + z * sigma into
                # one FMA (one rounding), and a selection is only bit-exact with the reference
                # (the authors' code) given the product rounded before the sum.
                enable_fp_fusion=False)


def perturbed_topk_full_bwd(grad: torch.Tensor, scores: torch.Tensor, k: int, num_samples: int,
                            sigma: float, noise: torch.Tensor | None, seed: int, gumbel: bool):
    """grad ``[b, k, d]``, scores ``[b, d]`` -> the full estimator's grad_scores, float32
    ``[b, d]`` (see the ops module); the forward's noise and selections are redrawn."""
    scores, grad = scores.contiguous(), grad.to(torch.float32).contiguous()
    b, d = scores.shape
    out = torch.empty((b, d), device=scores.device, dtype=torch.float32)
    if b == 0:
        return out
    has_noise = noise is not None
    with device_guard(scores):
        _perturbed_topk_full_bwd_kernel[(b,)](
            grad, scores, noise.contiguous() if has_noise else out, out, d, k, num_samples, sigma,
            HAS_NOISE=has_noise, GUMBEL=gumbel,
            # It holds no one-hot, but at 64 samples a block (the size k_pad = 1 would give)
            # float64 spilled 36-60 B on sm_80/sm_90: the forward's block at k = 3 to 4.
            **_launch_config(scores, 4, num_samples, seed))
    return out


def perturbed_topk_bwd(grad: torch.Tensor, w: torch.Tensor, num_samples: int, sigma: float):
    """grad ``[b, k, d]``, W ``[b, k, d]`` -> grad_scores float32 ``[b, d]``."""
    grad, w = grad.contiguous(), w.contiguous()
    b, k, d = w.shape
    out = torch.empty((b, d), device=w.device, dtype=torch.float32)
    if b == 0:
        return out
    k_pad = triton.next_power_of_2(k)
    block_d = triton.next_power_of_2(d) if triton_interpret() else max(1, min(
        triton.next_power_of_2(d), 4096 // k_pad))
    n_blocks = triton.cdiv(d, block_d)
    with device_guard(w):
        _perturbed_topk_bwd_kernel[(b * n_blocks,)](
            grad, w, out, d, k, num_samples, sigma, n_blocks, BLOCK_D=block_d, K_PAD=k_pad)
    return out
