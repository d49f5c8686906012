"""ISA and Bi-ISA (SPEC 3) in Triton; the math is the transcription of csrc/include/tvr/isa.h.

* isa: each program reduces BLOCK_R rows of a ``[R, n]`` tensor, the reduced axis padded to a
  block ``BLOCK_N`` (masked entries are -inf inside softmaxes and 0 elsewhere); ``A @ weight``
  is a ``tl.dot``. The backward writes one partial weight gradient per program (summed on the
  host: deterministic).
* bi_isa: one program per (text, video) pair. It accumulates the ``[L, P]`` tile of G with
  ``tl.dot`` over blocks of D, runs both paths in registers, and writes one score. The
  backward recomputes the tile, forms dL/dG in registers and adds ``dG @ patches[v]`` and
  ``dG^T @ words[t]`` (and the four weight gradients) with atomics: nothing of size
  ``Bt * L * Bv * P`` exists in memory.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpret

# fp32 products must not silently drop to tf32: tau = 0.01 multiplies their error by 100.
_PRECISION = "ieee"


@triton.jit
def _softmax(x, mask, s, AXIS: tl.constexpr):
    """softmax(s * x) along AXIS, restricted to `mask` (0 outside it)."""
    z = tl.where(mask, x * s, float("-inf"))
    m = tl.max(z, axis=AXIS, keep_dims=True)
    e = tl.exp(z - m)
    e = tl.where(mask, e, 0.0)
    return e / tl.sum(e, axis=AXIS, keep_dims=True)


@triton.jit
def _isa_rows_fwd_kernel(x_ptr, w_ptr, y_ptr, R, n, s, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < R
    cmask = cols < n
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=m2, other=0.0).to(ACC)
    W = tl.load(w_ptr + cols[:, None] * n + cols[None, :], mask=cmask[:, None] & cmask[None, :],
                other=0.0).to(ACC)
    a = _softmax(x, cmask[None, :], s, 1)
    b = tl.dot(a, W, input_precision=_PRECISION, out_dtype=ACC)   # b_j = sum_i a_i W[i, j]
    w = _softmax(b, cmask[None, :], s, 1)
    y = tl.sum(w * x, axis=1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _isa_rows_bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, gw_part_ptr, R, n, s, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < R
    cmask = cols < n
    m2 = rmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=m2, other=0.0).to(ACC)
    W = tl.load(w_ptr + cols[:, None] * n + cols[None, :], mask=wmask, other=0.0).to(ACC)
    gy = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC)   # padded rows: no gradient
    a = _softmax(x, cmask[None, :], s, 1)
    b = tl.dot(a, W, input_precision=_PRECISION, out_dtype=ACC)
    w = _softmax(b, cmask[None, :], s, 1)
    y = tl.sum(w * x, axis=1)
    db = s * gy[:, None] * w * (x - y[:, None])
    da = tl.dot(db, tl.trans(W), input_precision=_PRECISION, out_dtype=ACC)   # W db
    gW = tl.dot(tl.trans(a), db, input_precision=_PRECISION, out_dtype=ACC)   # a^T db
    ada = tl.sum(a * da, axis=1)
    gx = gy[:, None] * w + s * a * (da - ada[:, None])
    tl.store(gx_ptr + rows[:, None] * n + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m2)
    tl.store(gw_part_ptr + pid.to(tl.int64) * n * n + cols[:, None] * n + cols[None, :], gW,
             mask=wmask)


def _isa_blocks(R: int, n: int) -> tuple[int, int]:
    block_n = max(16, triton.next_power_of_2(n))   # tl.dot needs every dimension >= 16
    if triton_interpret():  # each program instance costs milliseconds: few, large programs
        return max(16, min(triton.next_power_of_2(max(R, 1)), 1024)), block_n
    return max(16, min(64, 4096 // block_n)), block_n


def _acc(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def isa_fwd(x: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """x: [R, n] contiguous, weight: [n, n] -> [R]."""
    R, n = x.shape
    y = torch.empty(R, device=x.device, dtype=x.dtype)
    if R == 0:
        return y
    acc, _ = _acc(x)
    br, bn = _isa_blocks(R, n)
    _isa_rows_fwd_kernel[(triton.cdiv(R, br),)](x, weight, y, R, n, 1.0 / tau, ACC=acc,
                                                 BLOCK_R=br, BLOCK_N=bn)
    return y


def isa_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, tau: float):
    """grad: [R], x: [R, n], weight: [n, n] -> (grad x [R, n], grad weight [n, n])."""
    R, n = x.shape
    gx = torch.empty_like(x)
    acc, acc_t = _acc(x)
    if R == 0:
        return gx, torch.zeros_like(weight)
    br, bn = _isa_blocks(R, n)
    grid = triton.cdiv(R, br)
    part = torch.empty(grid, n, n, device=x.device, dtype=acc_t)
    _isa_rows_bwd_kernel[(grid,)](grad, x, weight, gx, part, R, n, 1.0 / tau, ACC=acc,
                                  BLOCK_R=br, BLOCK_N=bn)
    return gx, part.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Bi-ISA


@triton.jit
def _g_tile(words_ptr, patches_ptr, t, v, L, P, D, ACC: tl.constexpr, BL: tl.constexpr,
            BP: tl.constexpr, BD: tl.constexpr):
    """G[t, :, v, :] = words[t] @ patches[v]^T as an [BL, BP] register tile."""
    ls = tl.arange(0, BL)
    ps = tl.arange(0, BP)
    G = tl.zeros((BL, BP), dtype=ACC)
    w_base = words_ptr + t * L * D
    p_base = patches_ptr + v * P * D
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        wt = tl.load(w_base + ls[:, None] * D + ds[None, :], mask=(ls < L)[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        pt = tl.load(p_base + ps[:, None] * D + ds[None, :], mask=(ps < P)[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        G += tl.dot(wt, tl.trans(pt), input_precision=_PRECISION, out_dtype=ACC)
    return G


@triton.jit
def _load_square(ptr, n, BN: tl.constexpr, ACC: tl.constexpr):
    i = tl.arange(0, BN)
    m = i < n
    return tl.load(ptr + i[:, None] * n + i[None, :], mask=m[:, None] & m[None, :], other=0.0).to(ACC)


@triton.jit
def _vec_isa(y, mask, W, s):
    """ISA of a vector y (second stages) with weight W; returns (a, w, result)."""
    a = _softmax(y[None, :], mask[None, :], s, 1)               # [1, n]
    b = tl.sum(tl.trans(a) * W, axis=0)                         # b_j = sum_i a_i W[i, j]
    w = _softmax(b[None, :], mask[None, :], s, 1)
    return a, w, tl.sum(w * y[None, :], axis=1)                 # [1, n], [1, n], [1]


@triton.jit
def _bi_isa_paths(G, ww, pw, ww2, pw2, lmask, pmask, s, ACC: tl.constexpr):
    """Both paths on a tile G [BL, BP]. Path A reduces the word axis (0) first, path B the
    patch axis (1)."""
    aA = _softmax(G, lmask[:, None], s, 0)
    bA = tl.dot(tl.trans(ww), aA, input_precision=_PRECISION, out_dtype=ACC)  # bA[j,p] = sum_i ww[i,j] aA[i,p]
    wA = _softmax(bA, lmask[:, None], s, 0)
    yA = tl.sum(wA * G, axis=0)                                                 # [BP]
    a2, w2, sA = _vec_isa(yA, pmask, pw2, s)
    aB = _softmax(G, pmask[None, :], s, 1)
    bB = tl.dot(aB, pw, input_precision=_PRECISION, out_dtype=ACC)             # bB[l,j] = sum_i aB[l,i] pw[i,j]
    wB = _softmax(bB, pmask[None, :], s, 1)
    yB = tl.sum(wB * G, axis=1)                                                 # [BL]
    a3, w3, sB = _vec_isa(yB, lmask, ww2, s)
    return aA, wA, yA, a2, w2, sA, aB, wB, yB, a3, w3, sB


@triton.jit
def _bi_isa_fwd_kernel(words_ptr, patches_ptr, ww_ptr, pw_ptr, ww2_ptr, pw2_ptr, out_ptr,
                       Bv, L, P, D, s, ACC: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr,
                       BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1).to(tl.int64)
    lmask = tl.arange(0, BL) < L
    pmask = tl.arange(0, BP) < P
    G = _g_tile(words_ptr, patches_ptr, t, v, L, P, D, ACC, BL, BP, BD)
    ww = _load_square(ww_ptr, L, BL, ACC)
    pw = _load_square(pw_ptr, P, BP, ACC)
    ww2 = _load_square(ww2_ptr, L, BL, ACC)
    pw2 = _load_square(pw2_ptr, P, BP, ACC)
    res = _bi_isa_paths(G, ww, pw, ww2, pw2, lmask, pmask, s, ACC)
    sA = res[5]
    sB = res[11]
    out = (sA + sB) / 2                                                          # [1]
    o = tl.arange(0, 1)
    tl.store(out_ptr + t * Bv + v + o, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _vec_isa_bwd(y, W, a, w, res, g, s):
    """Backward of _vec_isa for an incoming gradient g ([1]): (grad y [n], grad W [n, n])."""
    db = s * g[:, None] * w * (y[None, :] - res[:, None])          # [1, n]
    da = tl.sum(W * db, axis=1)                                    # da_i = sum_j W[i,j] db_j
    gW = tl.trans(a) * db                                          # a_i db_j
    ada = tl.sum(a * da[None, :], axis=1)                          # [1]
    gy = g[:, None] * w + s * a * (da[None, :] - ada[:, None])     # [1, n]
    return tl.sum(gy, axis=0), gW


@triton.jit
def _atomic_square(ptr, val, n, BN: tl.constexpr):
    i = tl.arange(0, BN)
    m = i < n
    tl.atomic_add(ptr + i[:, None] * n + i[None, :], val, mask=m[:, None] & m[None, :])


@triton.jit
def _bi_isa_bwd_kernel(grad_ptr, words_ptr, patches_ptr, ww_ptr, pw_ptr, ww2_ptr, pw2_ptr,
                       gwords_ptr, gpatches_ptr, gww_ptr, gpw_ptr, gww2_ptr, gpw2_ptr,
                       Bv, L, P, D, s, ACC: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr,
                       BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1).to(tl.int64)
    ls = tl.arange(0, BL)
    ps = tl.arange(0, BP)
    lmask = ls < L
    pmask = ps < P
    G = _g_tile(words_ptr, patches_ptr, t, v, L, P, D, ACC, BL, BP, BD)
    ww = _load_square(ww_ptr, L, BL, ACC)
    pw = _load_square(pw_ptr, P, BP, ACC)
    ww2 = _load_square(ww2_ptr, L, BL, ACC)
    pw2 = _load_square(pw2_ptr, P, BP, ACC)
    aA, wA, yA, a2, w2, sA, aB, wB, yB, a3, w3, sB = _bi_isa_paths(G, ww, pw, ww2, pw2, lmask,
                                                                   pmask, s, ACC)
    o = tl.arange(0, 1)
    half = tl.load(grad_ptr + t * Bv + v + o).to(ACC) / 2          # out = (sA + sB) / 2
    # Second stages (vectors).
    gyA, gpw2 = _vec_isa_bwd(yA, pw2, a2, w2, sA, half, s)          # [BP], [BP, BP]
    gyB, gww2 = _vec_isa_bwd(yB, ww2, a3, w3, sB, half, s)          # [BL], [BL, BL]
    # Path A, stage 1: ISA over the word axis (0) of every column p, incoming gradient gyA[p].
    dbA = s * gyA[None, :] * wA * (G - yA[None, :])
    daA = tl.dot(ww, dbA, input_precision=_PRECISION, out_dtype=ACC)            # ww dbA
    gww = tl.dot(aA, tl.trans(dbA), input_precision=_PRECISION, out_dtype=ACC)  # sum_p aA[i,p] dbA[j,p]
    adaA = tl.sum(aA * daA, axis=0)
    dG = gyA[None, :] * wA + s * aA * (daA - adaA[None, :])
    # Path B, stage 1: ISA over the patch axis (1) of every row l, incoming gradient gyB[l].
    dbB = s * gyB[:, None] * wB * (G - yB[:, None])
    daB = tl.dot(dbB, tl.trans(pw), input_precision=_PRECISION, out_dtype=ACC)  # daB[l,i] = sum_j pw[i,j] dbB[l,j]
    gpw = tl.dot(tl.trans(aB), dbB, input_precision=_PRECISION, out_dtype=ACC)
    adaB = tl.sum(aB * daB, axis=1)
    dG += gyB[:, None] * wB + s * aB * (daB - adaB[:, None])
    dG = tl.where(lmask[:, None] & pmask[None, :], dG, 0.0)
    _atomic_square(gww_ptr, gww, L, BL)
    _atomic_square(gpw_ptr, gpw, P, BP)
    _atomic_square(gww2_ptr, gww2, L, BL)
    _atomic_square(gpw2_ptr, gpw2, P, BP)
    # G[t, l, v, p] = <words[t, l], patches[v, p]>: push dG into both, block of D by block.
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        wm = lmask[:, None] & dm[None, :]
        pm = pmask[:, None] & dm[None, :]
        w_off = t * L * D + ls[:, None] * D + ds[None, :]
        p_off = v * P * D + ps[:, None] * D + ds[None, :]
        wt = tl.load(words_ptr + w_off, mask=wm, other=0.0).to(ACC)
        pt = tl.load(patches_ptr + p_off, mask=pm, other=0.0).to(ACC)
        tl.atomic_add(gwords_ptr + w_off, tl.dot(dG, pt, input_precision=_PRECISION, out_dtype=ACC),
                      mask=wm)
        tl.atomic_add(gpatches_ptr + p_off,
                      tl.dot(tl.trans(dG), wt, input_precision=_PRECISION, out_dtype=ACC), mask=pm)


def _bi_blocks(L: int, P: int, D: int) -> tuple[int, int, int]:
    bl = max(16, triton.next_power_of_2(L))
    bp = max(16, triton.next_power_of_2(P))
    cap = 128 if triton_interpret() else 64
    return bl, bp, max(16, min(triton.next_power_of_2(D), cap))


def bi_isa_fwd(words, patches, ww, pw, ww2, pw2, tau: float) -> torch.Tensor:
    """words [Bt, L, D], patches [Bv, P, D], weights [L, L], [P, P], [L, L], [P, P] -> [Bt, Bv]."""
    Bt, L, D = words.shape
    Bv, P, _ = patches.shape
    out = torch.empty(Bt, Bv, device=words.device, dtype=words.dtype)
    if Bt == 0 or Bv == 0:
        return out
    acc, _ = _acc(words)
    bl, bp, bd = _bi_blocks(L, P, D)
    args = [x.contiguous() for x in (words, patches, ww, pw, ww2, pw2)]
    _bi_isa_fwd_kernel[(Bt, Bv)](*args, out, Bv, L, P, D, 1.0 / tau, ACC=acc, BL=bl, BP=bp, BD=bd)
    return out


def bi_isa_bwd(grad, words, patches, ww, pw, ww2, pw2, tau: float):
    """Gradients of bi_isa_fwd to its six tensors, given grad [Bt, Bv]."""
    Bt, L, D = words.shape
    Bv, P, _ = patches.shape
    acc, acc_t = _acc(words)
    args = [x.contiguous() for x in (words, patches, ww, pw, ww2, pw2)]
    # Accumulated with atomics, so in the compute dtype; cast to the inputs' dtypes at the end.
    grads = [torch.zeros(x.shape, device=x.device, dtype=acc_t) for x in args]
    if Bt > 0 and Bv > 0:
        bl, bp, bd = _bi_blocks(L, P, D)
        _bi_isa_bwd_kernel[(Bt, Bv)](grad.contiguous(), *args, *grads, Bv, L, P, D, 1.0 / tau,
                                     ACC=acc, BL=bl, BP=bp, BD=bd)
    return tuple(g.to(x.dtype) for g, x in zip(grads, args))
