"""T-MASS stochastic max similarity (SPEC 5) in Triton: forward and backward.

Layout shared by both kernels: the embedding dimension is held as a ``[4, BLOCK_Q]`` tile whose
row ``l`` is the quarter ``d = l * Q + q`` (``Q = ceil(D / 4)``): one Philox call per column
``q`` yields the four noise values of that column (the keying of
csrc/include/tvr/stochastic_max_similarity.h, so every backend draws the same uniforms). The
radius weight is passed transposed (``W^T`` ``[T, D]``, a copy of ``D*T`` values) so each
frame's column of it is a contiguous load.

Forward: one program per (text i, video j) pair. Each sample costs its Philox draw and three
reductions, using the expansion ``t_m . p = t.p + sum eps (R p)`` and
``|t_m|^2 = |t|^2 + 2 sum eps (R t) + sum eps^2 R^2``.

Backward (through the selected sample ``m* = best[i, j]``, ``g = grad[i, j]``): with
``u = t + eps R``, ``c = cos(u, p)``, ``a = g / (|u| |p|)``,

    g dc/du = gu = a p - (g c / |u|^2) u          g dc/dp = gp = a u - (g c / |p|^2) p
    dz = gu * eps * R     (z = W S + b, R = exp(z))     dS = W^T dz

and ``S_k = cos(t, f_k)`` passes ``dS`` on to ``t`` and ``f_k``. One program per text ``i`` and
block of ``VB`` videos walks its pairs; per pair it regenerates ``eps[i, j, m*]`` with the
forward's draw (:func:`_prior_sample`) or loads it from the injected noise, writes
``grad_pooled[j, i]`` (each entry by exactly one program), ``dz[i, j]`` and ``S[i, j]``, and
sums ``gu`` over its videos into one row of a text partial. torch finishes, deterministically
(no atomics anywhere; plain sums and matmuls):

    grad_text   = sum of partials + (dS @ (f / |f|)) / |t| - (sum_jk dS S) t / |t|^2
    grad_frames = (dS^T @ (t / |t|)) / |f| - (sum_i dS S) f / |f|^2
    grad_W = dz^T S,   grad_b = sum_ij dz,   dS = dz @ W.

Memory of a backward, beyond its outputs (``grad_pooled`` has the size of ``pooled``):
``dz`` ``[Nt, Nv, D]`` in the compute dtype (the size of ``pooled``, twice its bytes for half
inputs; the only intermediate of that order), the text partials ``[Nt, ceil(Nv / VB), D]``
(``1 / VB`` of it), ``S`` and ``dS`` ``[Nt, Nv, T]`` and inputs-sized compute-dtype copies.
Nothing of size ``Nt*Nv*M*D``. A backward runs at training shapes (a batch of texts times a
batch of videos), where ``pooled`` is small; evaluation-sized calls have no backward.

Numerics: half and bfloat16 load as is and compute in float32; float64 computes in float64.

Compiled for sm_80 and sm_90 (triton 3.7.1, ``ptxas -v``) at the paper's shape (Nt = Nv = 128,
T = 12, D = 512, M = 20), every prior/noise source and dtype: forward 40-96 registers, backward
56-128, no spills, 16-64 bytes of shared memory (the reductions). Warps: one per 64 elements of
the tile, at most 4 (8 for the float64 backward, which at 4 spilled 12-16 bytes at D = 512).
At some other D the float64 backward still spills 8-16 bytes (D = 33, 256 and 768 on sm_90):
ptxas stops at an occupancy step (72, 96, 128 registers) rather than use more; float64 is for
tests, so this is left as is.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from ..reference.stochastic_max_similarity import philox_key
from . import device_guard
from .philox import box_muller, philox4x32_10, split_seed, unit_float


@triton.jit
def _dot(a, b):
    """Sum of ``a * b`` over a ``[4, BLOCK_Q]`` tile: a scalar."""
    return tl.sum(tl.sum(a * b, 1), 0)


@triton.jit
def _radius(t, t_norm, frames_ptr, wt_ptr, b_ptr, s_ptr, j, T, D, d, dm,
            STORE_S: tl.constexpr, ACC: tl.constexpr):
    """``R = exp(W S + b)`` (``[4, BLOCK_Q]``, 0 outside ``D``) of text ``t`` (norm ``t_norm``)
    and video ``j``, ``S_k = cos(t, f_jk)`` (the authors' cosine: norms, no epsilon); with
    ``STORE_S`` also writes ``S_k`` to ``s_ptr + k``."""
    z = tl.load(b_ptr + d, mask=dm, other=0.0).to(ACC)
    for k in range(T):
        f = tl.load(frames_ptr + (j * T + k) * D + d, mask=dm, other=0.0).to(ACC)
        s_k = _dot(t, f) / (t_norm * tl.sqrt(_dot(f, f)))
        if STORE_S:
            tl.store(s_ptr + k, s_k)
        z += tl.load(wt_ptr + k * D + d, mask=dm, other=0.0).to(ACC) * s_k
    return tl.where(dm, tl.exp(z), 0.0)


@triton.jit
def _prior_sample(noise_ptr, pair, m, gi, gj, M, D, q, lane, d, dm, key_lo, key_hi, stdf,
                  HAS_NOISE: tl.constexpr, NORMAL: tl.constexpr, ACC: tl.constexpr):
    """``eps[i, j, m]`` as a ``[4, BLOCK_Q]`` tile in ACC, 0 outside ``D``: loaded from the
    injected noise (``pair = i * Nv + j``, local) or drawn from Philox with counter
    ``(q, m, gj, gi)`` (global indices), output word ``l`` in quarter ``l`` (row ``lane == l``).
    The forward and the backward kernel both draw through here, so they see the same bits."""
    if HAS_NOISE:
        e = tl.load(noise_ptr + (pair * M + m) * D + d, mask=dm, other=0.0).to(ACC)
    else:
        # int64 counters (m, gj, gi < 2**32): the interpreter hands loop indices over as
        # Python ints, which have no .to(); philox4x32_10 truncates them to uint32.
        zero = tl.zeros_like(q).to(tl.int64)
        w0, w1, w2, w3 = philox4x32_10(q, zero + m, zero + gj, zero + gi, key_lo, key_hi)
        if NORMAL:
            e0, e1 = box_muller(w0, w1)
            e2, e3 = box_muller(w2, w3)
            # times std in float32, as the reference (a float argument is float32 on the GPU)
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
    return e


@triton.jit
def _pair_tile(BLOCK_Q: tl.constexpr, Q, D):
    """Column index ``q`` ``[BLOCK_Q]``, row ``lane`` ``[4]``, element index ``d = lane * Q + q``
    ``[4, BLOCK_Q]`` and its mask."""
    q = tl.arange(0, BLOCK_Q)
    lane = tl.arange(0, 4)
    d = lane[:, None] * Q + q[None, :]
    dm = (q[None, :] < Q) & (d < D)
    return q, lane, d, dm


# Seeds/key words are plain ints: one equal to 1 would be specialised to a constexpr (no .to()).
@triton.jit(do_not_specialize=["key_lo", "key_hi"])
def _smsim_fwd_kernel(text_ptr, frames_ptr, pooled_ptr, wt_ptr, b_ptr, noise_ptr, sims_ptr,
                      best_ptr, Nt, Nv, T, D, Q, M, i0, j0, key_lo, key_hi, stdf,
                      HAS_NOISE: tl.constexpr, NORMAL: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_Q: tl.constexpr):
    """sims, best ``[Nt, Nv]``: one program per pair ``(i, j)`` (1-D grid of ``Nt * Nv``)."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid // Nv
    j = pid % Nv
    q, lane, d, dm = _pair_tile(BLOCK_Q, Q, D)

    t = tl.load(text_ptr + i * D + d, mask=dm, other=0.0).to(ACC)
    p = tl.load(pooled_ptr + (j * Nt + i) * D + d, mask=dm, other=0.0).to(ACC)
    tt = _dot(t, t)
    pp = _dot(p, p)
    tp = _dot(t, p)
    R = _radius(t, tl.sqrt(tt), frames_ptr, wt_ptr, b_ptr, sims_ptr, j, T, D, d, dm,
                STORE_S=False, ACC=ACC)
    A = R * p
    B = R * t
    C = R * R
    p_norm = tl.sqrt(pp)

    best_c = tl.full((), float("-inf"), ACC)
    best_m = tl.full((), 0, tl.int64)
    for m in range(M):
        e = _prior_sample(noise_ptr, pid, m, i0 + i, j0 + j, M, D, q, lane, d, dm, key_lo,
                          key_hi, stdf, HAS_NOISE=HAS_NOISE, NORMAL=NORMAL, ACC=ACC)
        s1 = _dot(e, A)
        s2 = _dot(e, B)
        s3 = _dot(e * e, C)
        c = (tp + s1) / (tl.sqrt(tt + 2.0 * s2 + s3) * p_norm)
        # torch.max's rule, as csrc/include/tvr/stochastic_max_similarity.h:tmass_replaces_max:
        # NaN beats any number and the first NaN stays; else strict, so the first maximum wins
        upd = (c > best_c) | ((c != c) & (best_c == best_c))
        best_c = tl.where(upd, c, best_c)
        best_m = tl.where(upd, m, best_m)
    tl.store(sims_ptr + pid, best_c.to(sims_ptr.dtype.element_ty))
    tl.store(best_ptr + pid, best_m)


@triton.jit(do_not_specialize=["key_lo", "key_hi"])
def _smsim_bwd_kernel(grad_ptr, text_ptr, frames_ptr, pooled_ptr, wt_ptr, b_ptr, noise_ptr,
                      best_ptr, gpooled_ptr, dz_ptr, s_ptr, tpart_ptr,
                      Nt, Nv, T, D, Q, M, i0, j0, key_lo, key_hi, stdf, n_vblk,
                      VB: tl.constexpr, HAS_NOISE: tl.constexpr, NORMAL: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Program ``(i, jb)`` (1-D grid of ``Nt * n_vblk``) walks videos ``jb*VB .. jb*VB+VB-1``
    of text ``i`` and writes ``grad_pooled[j, i]`` ``[D]``, ``dz[i, j]`` ``[D]`` (ACC),
    ``S[i, j]`` ``[T]`` (ACC) per pair, and ``tpart[i, jb]`` ``[D]`` (ACC): the sum of ``gu``
    over its videos (see the module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid // n_vblk
    jb = pid % n_vblk
    q, lane, d, dm = _pair_tile(BLOCK_Q, Q, D)

    t = tl.load(text_ptr + i * D + d, mask=dm, other=0.0).to(ACC)
    t_norm = tl.sqrt(_dot(t, t))
    gu_sum = tl.zeros((4, BLOCK_Q), ACC)
    for j in range(jb * VB, tl.minimum(jb * VB + VB, Nv)):
        pair = i * Nv + j
        g = tl.load(grad_ptr + pair).to(ACC)
        p = tl.load(pooled_ptr + (j * Nt + i) * D + d, mask=dm, other=0.0).to(ACC)
        R = _radius(t, t_norm, frames_ptr, wt_ptr, b_ptr, s_ptr + pair * T, j, T, D, d, dm,
                    STORE_S=True, ACC=ACC)
        m = tl.load(best_ptr + pair)
        e = _prior_sample(noise_ptr, pair, m, i0 + i, j0 + j, M, D, q, lane, d, dm, key_lo,
                          key_hi, stdf, HAS_NOISE=HAS_NOISE, NORMAL=NORMAL, ACC=ACC)
        eR = e * R
        u = t + eR
        uu = _dot(u, u)
        pp = _dot(p, p)
        inv = 1.0 / (tl.sqrt(uu) * tl.sqrt(pp))
        a = g * inv
        gc = a * _dot(u, p)  # g * c
        gu = a * p - (gc / uu) * u
        gp = a * u - (gc / pp) * p
        tl.store(gpooled_ptr + (j * Nt + i) * D + d, gp.to(gpooled_ptr.dtype.element_ty),
                 mask=dm)
        tl.store(dz_ptr + pair * D + d, gu * eR, mask=dm)
        gu_sum += gu
    tl.store(tpart_ptr + pid * D + d, gu_sum, mask=dm)


def _common_args(text, frames, pooled, radius_weight, radius_bias, noise, seed):
    """Contiguous operands, ``W^T`` ``[T, D]``, the noise pointer, the key words and the
    compute dtype shared by both launchers."""
    acc = tl.float64 if text.dtype == torch.float64 else tl.float32
    text, frames, pooled = text.contiguous(), frames.contiguous(), pooled.contiguous()
    wt, b = radius_weight.t().contiguous(), radius_bias.contiguous()
    has_noise = noise is not None
    nz = noise.contiguous() if has_noise else text  # unused pointer when there is no noise
    key_lo, key_hi = split_seed(philox_key(seed))
    return text, frames, pooled, wt, b, nz, has_noise, key_lo, key_hi, acc


def _block_q(D: int) -> int:
    return max(triton.next_power_of_2((D + 3) // 4), 2)


def _num_warps(block_q: int, max_warps: int) -> int:
    """One warp per 64 elements of the ``[4, BLOCK_Q]`` tile (two a thread), at most
    ``max_warps``: a small D gets one warp instead of threads holding copies (with which ptxas
    also capped registers at 32 and spilled a few bytes)."""
    return max(1, min(max_warps, 4 * block_q // 64))


def stochastic_max_similarity_fwd(text, frames, pooled, radius_weight, radius_bias, num_samples,
                                  prior, std, seed, noise, text_offset, video_offset):
    """Same contract as ``torch.ops.tvr_C.stochastic_max_similarity_fwd``: ``(sims, best)``
    ``[Nt, Nv]`` for text ``[Nt, D]``, frames ``[Nv, T, D]``, pooled ``[Nv, Nt, D]``."""
    Nt, D = text.shape
    Nv, T, _ = frames.shape
    sims = torch.empty(Nt, Nv, dtype=text.dtype, device=text.device)
    best = torch.empty(Nt, Nv, dtype=torch.int64, device=text.device)
    if Nt * Nv == 0:
        return sims, best
    text, frames, pooled, wt, b, nz, has_noise, key_lo, key_hi, acc = _common_args(
        text, frames, pooled, radius_weight, radius_bias, noise, seed)
    with device_guard(text):
        _smsim_fwd_kernel[(Nt * Nv,)](
            text, frames, pooled, wt, b, nz, sims, best, Nt, Nv, T, D, (D + 3) // 4,
            num_samples, text_offset, video_offset, key_lo, key_hi, float(std),
            HAS_NOISE=has_noise, NORMAL=(prior == "normal"), ACC=acc, BLOCK_Q=_block_q(D),
            num_warps=_num_warps(_block_q(D), 4))
    return sims, best


def _videos_per_program(Nv: int) -> int:
    if triton_interpret():  # each program instance costs milliseconds: few, long programs
        return max(Nv, 1)
    # 8: Nt * Nv / 8 programs (2048 at the paper's 128 x 128) keep every SM busy, and the text
    # partials stay 1/8 of pooled's size.
    return max(min(Nv, 8), 1)


def stochastic_max_similarity_bwd(grad, text, frames, pooled, radius_weight, radius_bias, best,
                                  num_samples, prior, std, seed, noise, text_offset,
                                  video_offset):
    """Same contract as ``torch.ops.tvr_C.stochastic_max_similarity_bwd``: gradients of
    ``sum(grad * sims)`` (``grad`` ``[Nt, Nv]``, ``best`` the forward's ``[Nt, Nv]`` int64)
    with respect to text ``[Nt, D]``, frames ``[Nv, T, D]``, pooled ``[Nv, Nt, D]``,
    radius_weight ``[D, T]``, radius_bias ``[D]``, each in its input's dtype."""
    Nt, D = text.shape
    Nv, T, _ = frames.shape
    dtype = text.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    dev = text.device
    if Nt * Nv * D == 0:
        return (torch.zeros(Nt, D, dtype=dtype, device=dev),
                torch.zeros(Nv, T, D, dtype=dtype, device=dev),
                torch.zeros(Nv, Nt, D, dtype=dtype, device=dev),
                torch.zeros(D, T, dtype=dtype, device=dev), torch.zeros(D, dtype=dtype, device=dev))
    text, frames, pooled, wt, b, nz, has_noise, key_lo, key_hi, acc = _common_args(
        text, frames, pooled, radius_weight, radius_bias, noise, seed)
    grad, best = grad.contiguous(), best.contiguous()
    vb = _videos_per_program(Nv)
    n_vblk = triton.cdiv(Nv, vb)
    gpooled = torch.empty(Nv, Nt, D, dtype=dtype, device=dev)
    dz = torch.empty(Nt, Nv, D, dtype=ct, device=dev)
    S = torch.empty(Nt, Nv, T, dtype=ct, device=dev)
    tpart = torch.empty(Nt, n_vblk, D, dtype=ct, device=dev)
    with device_guard(text):
        _smsim_bwd_kernel[(Nt * n_vblk,)](
            grad, text, frames, pooled, wt, b, nz, best, gpooled, dz, S, tpart,
            Nt, Nv, T, D, (D + 3) // 4, num_samples, text_offset, video_offset, key_lo, key_hi,
            float(std), n_vblk, VB=vb, HAS_NOISE=has_noise, NORMAL=(prior == "normal"),
            ACC=acc, BLOCK_Q=_block_q(D),
            # float64 at D = 512 needs 128+ registers a thread at 4 warps (ptxas spilled
            # 12-16 bytes on sm_90); 8 warps halve each thread's share of the tiles.
            num_warps=_num_warps(_block_q(D), 8 if acc == tl.float64 else 4))
        tx, fx, w = text.to(ct), frames.to(ct), radius_weight.to(ct)
        t_norm = tx.norm(dim=-1, keepdim=True)                          # [Nt, 1]
        f_norm = fx.norm(dim=-1, keepdim=True)                          # [Nv, T, 1]
        dS = torch.matmul(dz, w)                                        # [Nt, Nv, T]
        dSS = dS * S
        g_text = (tpart.sum(1) + torch.einsum("ijk,jkd->id", dS, fx / f_norm) / t_norm
                  - dSS.sum((1, 2))[:, None] * tx / t_norm ** 2)
        g_frames = (torch.einsum("ijk,id->jkd", dS, tx / t_norm) / f_norm
                    - dSS.sum(0)[..., None] * fx / f_norm ** 2)
        g_w = torch.einsum("ijd,ijk->dk", dz, S)
        g_b = dz.sum((0, 1))
    # contiguous, as the fake kernel promises (einsum may return permuted layouts)
    return tuple(x.to(dtype).contiguous() for x in (g_text, g_frames, gpooled, g_w, g_b))
