"""T-MASS stochastic max similarity (SPEC 5) in Triton: forward only.

One program per (text i, video j) pair. The embedding dimension is held as a ``[4, BLOCK_Q]``
tile whose row ``l`` is the quarter ``d = l * Q + q`` (``Q = ceil(D / 4)``): one Philox call
per column ``q`` yields the four noise values of that column (the keying of
csrc/include/tvr/stochastic_max_similarity.h, so every backend draws the same uniforms).
Each sample costs its Philox draw and three reductions, using the expansion
``t_m . p = t.p + sum eps (R p)`` and ``|t_m|^2 = |t|^2 + 2 sum eps (R t) + sum eps^2 R^2``.

Backward: there is no Triton kernel; ``tvr::stochastic_max_similarity_backward`` falls back to
the C++ kernel for CPU tensors and to the reference (plain torch on the same device) otherwise.
"""
import torch
import triton
import triton.language as tl

from ..reference.stochastic_max_similarity import philox_key
from .philox import box_muller, philox4x32_10, split_seed, unit_float


@triton.jit
def _smsim_fwd_kernel(text_ptr, frames_ptr, pooled_ptr, w_ptr, b_ptr, noise_ptr, sims_ptr, best_ptr,
                      Nt, Nv, T, D, Q, M, i0, j0, key_lo, key_hi, stdf,
                      HAS_NOISE: tl.constexpr, NORMAL: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid // Nv
    j = pid % Nv
    q = tl.arange(0, BLOCK_Q)
    lane = tl.arange(0, 4)
    d = lane[:, None] * Q + q[None, :]                       # [4, BLOCK_Q] element index
    dm = (q[None, :] < Q) & (d < D)

    t = tl.load(text_ptr + i * D + d, mask=dm, other=0.0).to(ACC)
    p = tl.load(pooled_ptr + (j * Nt + i) * D + d, mask=dm, other=0.0).to(ACC)
    tt = tl.sum(tl.sum(t * t, 1), 0)
    pp = tl.sum(tl.sum(p * p, 1), 0)
    tp = tl.sum(tl.sum(t * p, 1), 0)
    t_norm = tl.sqrt(tt)

    # Radius R = exp(W S + b), S_k = cos(t, f_k).
    z = tl.load(b_ptr + d, mask=dm, other=0.0).to(ACC)
    for k in range(T):
        f = tl.load(frames_ptr + (j * T + k) * D + d, mask=dm, other=0.0).to(ACC)
        s_k = tl.sum(tl.sum(t * f, 1), 0) / (t_norm * tl.sqrt(tl.sum(tl.sum(f * f, 1), 0)))
        wk = tl.load(w_ptr + d * T + k, mask=dm, other=0.0).to(ACC)
        z += wk * s_k
    R = tl.where(dm, tl.exp(z), 0.0)
    A = R * p
    B = R * t
    C = R * R
    p_norm = tl.sqrt(pp)

    best_c = tl.full((), float("-inf"), ACC)
    best_m = tl.full((), 0, tl.int64)
    zero_q = tl.zeros((BLOCK_Q,), tl.uint32)
    for m in range(M):
        if HAS_NOISE:
            e = tl.load(noise_ptr + ((i * Nv + j) * M + m) * D + d, mask=dm, other=0.0).to(ACC)
        else:
            c0 = q.to(tl.uint32)
            c1 = zero_q + m
            c2 = zero_q + (j0 + j).to(tl.uint32)
            c3 = zero_q + (i0 + i).to(tl.uint32)
            w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, key_lo, key_hi)
            if NORMAL:
                e0, e1 = box_muller(w0, w1)
                e2, e3 = box_muller(w2, w3)
                e0 = e0 * stdf
                e1 = e1 * stdf
                e2 = e2 * stdf
                e3 = e3 * stdf
            else:
                e0 = unit_float(w0)
                e1 = unit_float(w1)
                e2 = unit_float(w2)
                e3 = unit_float(w3)
            l2 = lane[:, None]
            e = tl.where(l2 == 0, e0[None, :],
                         tl.where(l2 == 1, e1[None, :], tl.where(l2 == 2, e2[None, :], e3[None, :])))
            e = tl.where(dm, e.to(ACC), 0.0)
        s1 = tl.sum(tl.sum(e * A, 1), 0)
        s2 = tl.sum(tl.sum(e * B, 1), 0)
        s3 = tl.sum(tl.sum(e * e * C, 1), 0)
        c = (tp + s1) / (tl.sqrt(tt + 2.0 * s2 + s3) * p_norm)
        upd = c > best_c  # strict: the first maximum wins
        best_c = tl.where(upd, c, best_c)
        best_m = tl.where(upd, m, best_m)
    tl.store(sims_ptr + i * Nv + j, best_c.to(sims_ptr.dtype.element_ty))
    tl.store(best_ptr + i * Nv + j, best_m)


def stochastic_max_similarity_fwd(text, frames, pooled, radius_weight, radius_bias, num_samples,
                                  prior, std, seed, noise, text_offset, video_offset):
    """Same contract as ``torch.ops.tvr_C.stochastic_max_similarity_fwd``: ``(sims, best)``
    ``[Nt, Nv]`` for text ``[Nt, D]``, frames ``[Nv, T, D]``, pooled ``[Nv, Nt, D]``."""
    Nt, D = text.shape
    Nv, T, _ = frames.shape
    # bf16/half load as is and compute in float32; float64 computes in float64.
    acc = tl.float64 if text.dtype == torch.float64 else tl.float32
    text, frames, pooled = text.contiguous(), frames.contiguous(), pooled.contiguous()
    w, b = radius_weight.contiguous(), radius_bias.contiguous()
    sims = torch.empty(Nt, Nv, dtype=text.dtype, device=text.device)
    best = torch.empty(Nt, Nv, dtype=torch.int64, device=text.device)
    if Nt * Nv == 0:
        return sims, best
    Q = (D + 3) // 4
    key_lo, key_hi = split_seed(philox_key(seed))
    has_noise = noise is not None
    nz = noise.contiguous() if has_noise else text  # unused pointer when there is no noise
    _smsim_fwd_kernel[(Nt * Nv,)](
        text, frames, pooled, w, b, nz, sims, best, Nt, Nv, T, D, Q, num_samples,
        text_offset, video_offset, key_lo, key_hi, float(std),
        HAS_NOISE=has_noise, NORMAL=(prior == "normal"), ACC=acc,
        BLOCK_Q=max(triton.next_power_of_2(Q), 2))
    return sims, best
