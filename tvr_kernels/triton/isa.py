"""ISA and Bi-ISA (SPEC 3) in Triton; the math is the transcription of csrc/include/tvr/isa.h.

isa reduces the rows of an ``[R, n]`` tensor, by one of two paths the launcher picks from n
(separately for the forward and the backward, whose limits differ):

* rows (n up to ``_ISA_ROWS_MAX_N``): a program holds BLOCK_R whole rows padded to BLOCK_N, and
  the ``[BLOCK_N, BLOCK_N]`` weight, in registers; ``A @ weight`` is one ``tl.dot``. Backward
  programs each walk a fixed set of row blocks, accumulate the weight gradient in registers
  and write one partial (summed by torch: deterministic, memory independent of R).
* tiled (larger n, e.g. ViT-B/16's 196 patches, whose 256 x 256 fp32 weight tile alone would
  fill sm_90's shared memory): nothing n-wide is held. Rows are walked in column blocks of
  BLOCK_C; ``B = A @ weight`` is built block by block from ``BLOCK_C x BLOCK_C`` weight blocks
  read from global memory, A's entries recomputed from x and A's row statistics, and the second
  softmax is an online softmax. The backward keeps B and dL/dB of its rows in global scratch
  (``[rows, n]`` in the accumulation dtype, bounded by chunking the rows) and leaves
  ``grad weight = A^T dL/dB`` to a torch GEMM.

bi_isa: the forward runs one program per (text, video) pair on a 1-D grid: it accumulates
the ``[L, P]`` tile of G with ``tl.dot`` over blocks of D, runs both paths in registers, and
writes one score. The backward is deterministic (no atomics): pairs are processed in chunks
(texts by videos) whose buffers stay within ``_BI_BWD_BUFFER_BYTES``; one program per pair
recomputes the tile and writes dL/dG ``[L, P]`` and the factors of the four weight gradients
(first stages: A1 and dL/dB1 ``[L, P]`` per path; second stages: two vectors per path) to its
own slots, and torch forms ``grad words = dG @ patches``, ``grad patches = dG^T @ words`` and
the weight gradients with GEMMs, in an order fixed by the shapes. (Summing the first stages'
weight gradients in the kernel, over the videos of a program, spilled registers.)

All products run in ieee precision (tau = 0.01 multiplies tf32's error by 100 inside the
softmaxes). The GEMMs left to torch come after the softmaxes; they follow torch's own fp32
matmul precision setting (``torch.backends.cuda.matmul.allow_tf32``, off by default).
"""
import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from . import device_guard

_PRECISION: tl.constexpr = tl.constexpr("ieee")

# isa: largest n held whole in registers (rows path), forward and backward, in float32/16;
# half that in float64. Above it, the tiled path. (The rows backward at BLOCK_N = 64 used
# 255 registers with 4 warps, and spilled 8-12 B with 4 or 8 warps on sm_80 or sm_90
# depending on the specialisation; the tiled backward takes 72-119 registers there.)
_ISA_ROWS_MAX_N = (64, 32)
# isa, rows path: elements (rows x BLOCK_N) per block of rows, in float32.
_ISA_ROWS_ELEMS = 1024
# isa, rows path: warps per program (forward, backward) by BLOCK_N.
_ISA_ROWS_WARPS = {16: (4, 4), 32: (4, 4), 64: (4, 4)}
# isa, tiled path: width of the column blocks on a GPU and warps, (forward, backward). The
# backward at 32 uses 255 registers on sm_90 and spills on sm_80; at 16, 96-104 registers.
_ISA_TILE_C = (32, 16)
_ISA_TILED_WARPS = (4, 4)
# isa, rows path backward: programs (each one weight-gradient partial of n * n).
_ISA_BWD_PROGRAMS = 1024
# isa, tiled path backward: bytes of the B / dL/dB scratch; rows are processed in chunks.
_ISA_SCRATCH_BYTES = 64 << 20
# Grid axis 0 limit of CUDA.
_MAX_GRID = 2**31 - 1
# bi_isa: largest L and P. The kernels hold the [L, P] tile and the [L, L] and [P, P] weights
# whole: at 128 (sm_80, 8 warps) float32 takes 131-147 KiB of shared memory, spills 47-90 KB
# of registers and compiles for minutes; float64 needs 256-288 KiB (over the limit). At 64
# they compile in seconds within 82 KiB.
_BI_MAX_N = 64
# bi_isa backward: bytes of the buffers of one chunk of (text, video) pairs.
_BI_BWD_BUFFER_BYTES = 64 << 20
# bi_isa: warps per program, forward and backward.
_BI_WARPS = (8, 8)


# --------------------------------------------------------------------------------------------
# Shared math


@triton.jit
def _softmax(x, mask, s, AXIS: tl.constexpr):
    """softmax(s * x) along AXIS, restricted to `mask` (0 outside it)."""
    z = tl.where(mask, x * s, float("-inf"))
    m = tl.max(z, axis=AXIS, keep_dims=True)
    e = tl.exp(z - m)
    e = tl.where(mask, e, 0.0)
    return e / tl.sum(e, axis=AXIS, keep_dims=True)


@triton.jit
def _mm(a, b, ACC: tl.constexpr, DOT: tl.constexpr):
    """a [M, K] @ b [K, N]; DOT=False for a single row (tl.dot needs M >= 16)."""
    if DOT:
        r = tl.dot(a, b, input_precision=_PRECISION, out_dtype=ACC)
    else:
        r = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return r


@triton.jit
def _mm_t(a, b, ACC: tl.constexpr, DOT: tl.constexpr):
    """a [M, K] @ b[N, K]^T."""
    if DOT:
        r = tl.dot(a, tl.trans(b), input_precision=_PRECISION, out_dtype=ACC)
    else:
        r = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    return r


@triton.jit
def _isa_tile(x, mask, W, s, ACC: tl.constexpr, DOT: tl.constexpr):
    """ISA along axis 1 of every row of x [M, N] (`mask` [1, N]: valid columns) with weight
    W [N, N]: returns (A [M, N], w [M, N], result [M])."""
    a = _softmax(x, mask, s, 1)
    b = _mm(a, W, ACC, DOT)                         # b_j = sum_i a_i W[i, j]
    w = _softmax(b, mask, s, 1)
    return a, w, tl.sum(w * x, axis=1)


@triton.jit
def _isa_tile_bwd(x, W, a, w, y, gy, s, ACC: tl.constexpr, DOT: tl.constexpr):
    """Backward of _isa_tile for the gradient gy [M] of its result: (grad x [M, N],
    dL/dB [M, N]); grad W = A^T dL/dB is left to the caller, which sums it over rows."""
    db = s * gy[:, None] * w * (x - y[:, None])
    da = _mm_t(db, W, ACC, DOT)                     # da_i = sum_j W[i, j] db_j
    ada = tl.sum(a * da, axis=1)
    gx = gy[:, None] * w + s * a * (da - ada[:, None])
    return gx, db


@triton.jit
def _load_cols(ptr, rows, rmask, c0, n, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Columns c0:c0+BLOCK_C of rows `rows` of a row-major [R, n] tensor (0 outside)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < n
    x = tl.load(ptr + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(ACC)
    return x, cols, cmask


@triton.jit
def _load_block(ptr, i0, j0, n, BI: tl.constexpr, BJ: tl.constexpr, ACC: tl.constexpr):
    """ptr[i0:i0+BI, j0:j0+BJ] of a row-major [n, n] matrix (0 outside)."""
    i = i0 + tl.arange(0, BI)
    j = j0 + tl.arange(0, BJ)
    return tl.load(ptr + i.to(tl.int64)[:, None] * n + j[None, :],
                   mask=(i < n)[:, None] & (j < n)[None, :], other=0.0).to(ACC)


# --------------------------------------------------------------------------------------------
# isa, rows path


@triton.jit
def _isa_rows_fwd_kernel(x_ptr, w_ptr, y_ptr, s_ptr, R, n, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [R, n], w [n, n], s [1] (1 / tau in ACC) -> y [R]; one block of rows per program."""
    s = tl.load(s_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    x, _, cmask = _load_cols(x_ptr, rows, rmask, 0, n, BLOCK_N, ACC)
    W = _load_block(w_ptr, 0, 0, n, BLOCK_N, BLOCK_N, ACC)
    _, _, y = _isa_tile(x, cmask[None, :], W, s, ACC, True)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _isa_rows_bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, gw_part_ptr, s_ptr, R, n,
                         ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """g [R], x [R, n], w [n, n] -> gx [R, n], gw_part [programs, n, n] (ACC). Program p
    handles row blocks p, p + programs, ...: the partials do not depend on R's size."""
    pid = tl.program_id(0)
    s = tl.load(s_ptr)
    W = _load_block(w_ptr, 0, 0, n, BLOCK_N, BLOCK_N, ACC)
    gW = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
    for blk in range(pid, tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
        # int64 before the product (blk is a plain int in the interpreter: no .to()).
        rows = (blk + tl.zeros((1,), tl.int64)) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        x, cols, cmask = _load_cols(x_ptr, rows, rmask, 0, n, BLOCK_N, ACC)
        gy = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC)   # padded rows: no gradient
        a, w, y = _isa_tile(x, cmask[None, :], W, s, ACC, True)
        gx, db = _isa_tile_bwd(x, W, a, w, y, gy, s, ACC, True)
        gW += tl.dot(tl.trans(a), db, input_precision=_PRECISION, out_dtype=ACC)
        tl.store(gx_ptr + rows[:, None] * n + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
    i = tl.arange(0, BLOCK_N)
    tl.store(gw_part_ptr + pid.to(tl.int64) * n * n + i[:, None] * n + i[None, :], gW,
             mask=(i < n)[:, None] & (i < n)[None, :])


# --------------------------------------------------------------------------------------------
# isa, tiled path


@triton.jit
def _online(m, l, acc, z, v):
    """One block of an online softmax-weighted sum: folds logits z [BR, BC] (-inf where
    masked) with values v into the running row max m, sum of exp l, and sum of exp * v acc."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, l * alpha + tl.sum(e, axis=1), acc * alpha + tl.sum(e * v, axis=1)


@triton.jit
def _softmax_cols(x, cmask, m, l, s):
    """Entries of softmax(s * x) of a column block, given the rows' max m and sum l."""
    return tl.where(cmask[None, :], tl.exp(x * s - m[:, None]), 0.0) / l[:, None]


@triton.jit
def _row_stats(x_ptr, rows, rmask, n, s, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """(max, sum of exp(s * x - max)) of each row: A's statistics."""
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_R,), ACC)
    for c0 in range(0, n, BLOCK_C):
        x, _, cmask = _load_cols(x_ptr, rows, rmask, c0, n, BLOCK_C, ACC)
        m, l, _ = _online(m, l, l, tl.where(cmask[None, :], x * s, float("-inf")), x)
    return m, l


@triton.jit
def _b_cols(x_ptr, w_ptr, rows, rmask, j0, n, s, m1, l1, ACC: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns j0:j0+BLOCK_C of B = A @ W, A recomputed block by block from x and (m1, l1)."""
    b = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for i0 in range(0, n, BLOCK_C):
        x, _, imask = _load_cols(x_ptr, rows, rmask, i0, n, BLOCK_C, ACC)
        a = _softmax_cols(x, imask, m1, l1, s)
        b += tl.dot(a, _load_block(w_ptr, i0, j0, n, BLOCK_C, BLOCK_C, ACC),
                    input_precision=_PRECISION, out_dtype=ACC)
    return b


@triton.jit
def _isa_tiled_fwd_kernel(x_ptr, w_ptr, y_ptr, s_ptr, R, n, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """x [R, n], w [n, n], s [1] -> y [R], any n: only BLOCK_C-wide blocks are held."""
    # Every loop over n runs at least once: without the hint ptxas spills the values that
    # merge at a loop's zero-trip exit.
    tl.assume(n > 0)
    s = tl.load(s_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    m1, l1 = _row_stats(x_ptr, rows, rmask, n, s, ACC, BLOCK_R, BLOCK_C)
    m2 = tl.full((BLOCK_R,), float("-inf"), ACC)
    l2 = tl.zeros((BLOCK_R,), ACC)
    acc = tl.zeros((BLOCK_R,), ACC)
    for j0 in range(0, n, BLOCK_C):
        b = _b_cols(x_ptr, w_ptr, rows, rmask, j0, n, s, m1, l1, ACC, BLOCK_R, BLOCK_C)
        x, _, jmask = _load_cols(x_ptr, rows, rmask, j0, n, BLOCK_C, ACC)
        m2, l2, acc = _online(m2, l2, acc, tl.where(jmask[None, :], b * s, float("-inf")), x)
    tl.store(y_ptr + rows, (acc / l2).to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _isa_tiled_bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, b_ptr, db_ptr, s_ptr, R, n,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """g [R], x [R, n], w [n, n] -> gx [R, n]; b, db: [R, n] scratch (ACC). On return b holds
    A and db holds dL/dB, so that grad w = A^T dL/dB (a GEMM on the host).

    Uses ada = sum_i A_i dA_i = sum_j B_j dB_j (dA = dB W^T, B = A W), known before dA."""
    tl.assume(n > 0)         # see _isa_tiled_fwd_kernel
    s = tl.load(s_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    gy = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC)      # padded rows: no gradient
    m1, l1 = _row_stats(x_ptr, rows, rmask, n, s, ACC, BLOCK_R, BLOCK_C)
    m2 = tl.full((BLOCK_R,), float("-inf"), ACC)
    l2 = tl.zeros((BLOCK_R,), ACC)
    acc = tl.zeros((BLOCK_R,), ACC)
    for j0 in range(0, n, BLOCK_C):
        b = _b_cols(x_ptr, w_ptr, rows, rmask, j0, n, s, m1, l1, ACC, BLOCK_R, BLOCK_C)
        x, cols, jmask = _load_cols(x_ptr, rows, rmask, j0, n, BLOCK_C, ACC)
        tl.store(b_ptr + rows[:, None] * n + cols[None, :], b, mask=rmask[:, None] & jmask[None, :])
        m2, l2, acc = _online(m2, l2, acc, tl.where(jmask[None, :], b * s, float("-inf")), x)
    y = acc / l2
    # The scratch is read back below in other layouts, i.e. by other threads of this program.
    tl.debug_barrier()
    ada = tl.zeros((BLOCK_R,), ACC)
    for j0 in range(0, n, BLOCK_C):
        b, cols, jmask = _load_cols(b_ptr, rows, rmask, j0, n, BLOCK_C, ACC)
        x, _, _ = _load_cols(x_ptr, rows, rmask, j0, n, BLOCK_C, ACC)
        db = s * gy[:, None] * _softmax_cols(b, jmask, m2, l2, s) * (x - y[:, None])
        ada += tl.sum(b * db, axis=1)
        tl.store(db_ptr + rows[:, None] * n + cols[None, :], db, mask=rmask[:, None] & jmask[None, :])
    tl.debug_barrier()
    for i0 in range(0, n, BLOCK_C):
        da = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for j0 in range(0, n, BLOCK_C):
            db, _, _ = _load_cols(db_ptr, rows, rmask, j0, n, BLOCK_C, ACC)
            da += tl.dot(db, tl.trans(_load_block(w_ptr, i0, j0, n, BLOCK_C, BLOCK_C, ACC)),
                         input_precision=_PRECISION, out_dtype=ACC)
        x, cols, imask = _load_cols(x_ptr, rows, rmask, i0, n, BLOCK_C, ACC)
        b, _, _ = _load_cols(b_ptr, rows, rmask, i0, n, BLOCK_C, ACC)
        a = _softmax_cols(x, imask, m1, l1, s)
        gx = gy[:, None] * _softmax_cols(b, imask, m2, l2, s) + s * a * (da - ada[:, None])
        tl.store(gx_ptr + rows[:, None] * n + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & imask[None, :])
    tl.debug_barrier()   # every thread has read B before A overwrites it
    for i0 in range(0, n, BLOCK_C):
        x, cols, imask = _load_cols(x_ptr, rows, rmask, i0, n, BLOCK_C, ACC)
        tl.store(b_ptr + rows[:, None] * n + cols[None, :], _softmax_cols(x, imask, m1, l1, s),
                 mask=rmask[:, None] & imask[None, :])


# --------------------------------------------------------------------------------------------
# isa launchers


def _acc(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _scale(tau: float, x: torch.Tensor) -> torch.Tensor:
    """1 / tau as a 1-element tensor in the accumulation dtype: a Python float argument would
    reach a compiled kernel as fp32, even for float64 inputs."""
    return torch.full((1,), 1.0 / tau, dtype=_acc(x)[1], device=x.device)


def _isa_plan(R: int, n: int, acc_bytes: int, backward: bool = False) -> dict:
    """Path and launch parameters of isa for [R, n] rows (accumulating in acc_bytes floats)."""
    if n <= _ISA_ROWS_MAX_N[backward] * 4 // acc_bytes:
        block_n = max(16, triton.next_power_of_2(n))     # tl.dot needs every dimension >= 16
        if triton_interpret():  # each program instance costs milliseconds: few, large programs
            block_r = max(16, min(triton.next_power_of_2(max(R, 1)), 1024))
        else:
            block_r = max(16, min(64, _ISA_ROWS_ELEMS // block_n * 4 // acc_bytes))
        return dict(tiled=False, BLOCK_R=block_r, BLOCK_N=block_n,
                    num_warps=_ISA_ROWS_WARPS[block_n][backward])
    block_c = min(_ISA_TILE_C[backward], triton.next_power_of_2(n))
    block_r = max(16, min(triton.next_power_of_2(max(R, 1)), 1024)) if triton_interpret() else 16
    return dict(tiled=True, BLOCK_R=block_r, BLOCK_C=block_c,
                num_warps=_ISA_TILED_WARPS[backward])


def isa_fwd(x: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """x: [R, n] contiguous, weight: [n, n] contiguous -> [R]."""
    R, n = x.shape
    y = torch.empty(R, device=x.device, dtype=x.dtype)
    if R == 0:
        return y
    acc, acc_t = _acc(x)
    plan = _isa_plan(R, n, acc_t.itemsize)
    kernel = _isa_tiled_fwd_kernel if plan.pop("tiled") else _isa_rows_fwd_kernel
    with device_guard(x):
        kernel[(triton.cdiv(R, plan["BLOCK_R"]),)](x, weight, y, _scale(tau, x), R, n, ACC=acc,
                                                   **plan)
    return y


def isa_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, tau: float):
    """grad: [R], x: [R, n], weight: [n, n] (contiguous) -> (grad x [R, n], grad weight [n, n])."""
    R, n = x.shape
    gx = torch.empty_like(x)
    acc, acc_t = _acc(x)
    if R == 0:
        return gx, torch.zeros_like(weight)
    s = _scale(tau, x)
    plan = _isa_plan(R, n, acc_t.itemsize, backward=True)
    br = plan["BLOCK_R"]
    with device_guard(x):
        if not plan.pop("tiled"):
            grid = min(triton.cdiv(R, br), _ISA_BWD_PROGRAMS)
            part = torch.empty(grid, n, n, device=x.device, dtype=acc_t)
            _isa_rows_bwd_kernel[(grid,)](grad, x, weight, gx, part, s, R, n, ACC=acc, **plan)
            return gx, part.sum(0).to(weight.dtype)
        # Rows in chunks: the scratch (B, then A; dL/dB) stays within _ISA_SCRATCH_BYTES.
        rows = min(R, max(1, _ISA_SCRATCH_BYTES // (2 * n * acc_t.itemsize)))
        if rows > br:
            rows = rows // br * br        # whole blocks of rows per chunk
        a_buf = torch.empty(rows, n, device=x.device, dtype=acc_t)
        db_buf = torch.empty(rows, n, device=x.device, dtype=acc_t)
        gw = torch.zeros(n, n, device=x.device, dtype=acc_t)
        for r0 in range(0, R, rows):
            r = min(rows, R - r0)
            _isa_tiled_bwd_kernel[(triton.cdiv(r, br),)](grad[r0:], x[r0:], weight, gx[r0:], a_buf,
                                                         db_buf, s, r, n, ACC=acc, **plan)
            gw.addmm_(a_buf[:r].T, db_buf[:r])
    return gx, gw.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Bi-ISA


@triton.jit
def _g_tile(words_ptr, patches_ptr, t, v, L, P, D, ACC: tl.constexpr, BL: tl.constexpr,
            BP: tl.constexpr, BD: tl.constexpr):
    """G[t, :, v, :] = words[t] @ patches[v]^T as a [BL, BP] register tile (0 outside L, P)."""
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
def _path_fwd(X, M, N, w1_ptr, w2_ptr, s, ACC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr):
    """One Bi-ISA path on a tile X [BM, BN] (valid [M, N]): ISA along axis 1 with W1 [N, N]
    gives y [M], then ISA of y with W2 [M, M] gives the score ([1]). Path B is
    _path_fwd(G, L, P, patch_weight, word_weight2), path A the same on G^T."""
    nmask = tl.arange(0, BN) < N
    mmask = tl.arange(0, BM) < M
    _, _, y = _isa_tile(X, nmask[None, :], _load_block(w1_ptr, 0, 0, N, BN, BN, ACC), s, ACC,
                        True)
    _, _, score = _isa_tile(y[None, :], mmask[None, :], _load_block(w2_ptr, 0, 0, M, BM, BM, ACC),
                            s, ACC, False)
    return score


@triton.jit
def _path_bwd(X, M, N, w1_ptr, w2_ptr, g, s, fac_ptr, vec_ptr, pair, pairs, ACC: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr):
    """Backward of _path_fwd for the gradient g ([1]) of the score; returns grad X [BM, BN].
    The weight gradients are sums over all pairs of A1^T dB1 (W1) and outer(a2, db2) (W2),
    left to GEMMs on the host: this pair's factors go to fac [2, pairs, M, N] (A1, dL/dB1)
    and vec [2, pairs, M] (a2, dL/db2). Forming them here, in registers, would spill."""
    nmask = tl.arange(0, BN) < N
    mmask = tl.arange(0, BM) < M
    W1 = _load_block(w1_ptr, 0, 0, N, BN, BN, ACC)
    W2 = _load_block(w2_ptr, 0, 0, M, BM, BM, ACC)
    a1, w1, y = _isa_tile(X, nmask[None, :], W1, s, ACC, True)
    yv = y[None, :]
    a2, w2, score = _isa_tile(yv, mmask[None, :], W2, s, ACC, False)
    gyv, db2 = _isa_tile_bwd(yv, W2, a2, w2, score, g, s, ACC, False)
    gX, db1 = _isa_tile_bwd(X, W1, a1, w1, y, tl.sum(gyv, axis=0), s, ACC, True)
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    f = fac_ptr + pair * M * N + m[:, None] * N + n[None, :]
    fmask = mmask[:, None] & nmask[None, :]
    tl.store(f, a1, mask=fmask)
    tl.store(f + pairs * M * N, db1, mask=fmask)
    tl.store(vec_ptr + pair * M + m, tl.sum(a2, axis=0), mask=mmask)
    tl.store(vec_ptr + (pairs + pair) * M + m, tl.sum(db2, axis=0), mask=mmask)
    return gX


@triton.jit
def _bi_isa_fwd_kernel(words_ptr, patches_ptr, ww_ptr, pw_ptr, ww2_ptr, pw2_ptr, out_ptr, s_ptr,
                       t0, Bv, L, P, D, ACC: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr,
                       BD: tl.constexpr):
    """out [Bt, Bv]; program tt * Bv + v scores the pair (t0 + tt, v).

    Registers (L = 32, P = 48, 8 warps): 72-166, no spills in float32/16/bf16 on sm_80 and
    sm_90. float64 doubles every tile and spills 48 B past the 255-register cap on sm_90
    (16 warps halve the cap and spill more; a smaller block of D does not help)."""
    pid = tl.program_id(0).to(tl.int64)
    t = t0 + pid // Bv
    v = pid % Bv
    s = tl.load(s_ptr)
    G = _g_tile(words_ptr, patches_ptr, t, v, L, P, D, ACC, BL, BP, BD)
    sB = _path_fwd(G, L, P, pw_ptr, ww2_ptr, s, ACC, BL, BP)
    sA = _path_fwd(tl.trans(G), P, L, ww_ptr, pw2_ptr, s, ACC, BP, BL)
    tl.store(out_ptr + t * Bv + v + tl.arange(0, 1), ((sA + sB) / 2).to(out_ptr.dtype.element_ty))


@triton.jit
def _bi_isa_bwd_kernel(grad_ptr, words_ptr, patches_ptr, ww_ptr, pw_ptr, ww2_ptr, pw2_ptr,
                       dg_ptr, fac_a_ptr, vec_a_ptr, fac_b_ptr, vec_b_ptr, s_ptr,
                       t0, v0, Vc, pairs, Bv, L, P, D, ACC: tl.constexpr, BL: tl.constexpr,
                       BP: tl.constexpr, BD: tl.constexpr):
    """One chunk of pairs, texts t0 + [0, Tc) by videos v0 + [0, Vc); program tt * Vc + vv
    takes the pair (t0 + tt, v0 + vv) (pairs = Tc * Vc). Writes, in ACC: dg [Tc, L, Vc, P] =
    dL/dG, and the weight-gradient factors of path A (fac_a [2, pairs, P, L], vec_a
    [2, pairs, P]) and path B (fac_b [2, pairs, L, P], vec_b [2, pairs, L]), see _path_bwd.

    Registers (L = 32, P = 48, 8 warps): 128-176, no spills in float32/16/bf16 on sm_80 and
    sm_90. float64 doubles every tile and spills 2.4 KB (sm_90) / 4.4 KB (sm_80) per thread:
    one path's [L, P] tiles and dot operands exceed the 255-register cap (16 warps halve the
    cap and spill more). float64 serves gradchecks, not speed."""
    pair = tl.program_id(0).to(tl.int64)
    tt = pair // Vc
    vv = pair % Vc
    t = t0 + tt
    v = v0 + vv
    s = tl.load(s_ptr)
    G = _g_tile(words_ptr, patches_ptr, t, v, L, P, D, ACC, BL, BP, BD)
    half = tl.load(grad_ptr + t * Bv + v + tl.arange(0, 1)).to(ACC) / 2   # (sA + sB) / 2
    dG = _path_bwd(G, L, P, pw_ptr, ww2_ptr, half, s, fac_b_ptr, vec_b_ptr, pair, pairs, ACC,
                   BL, BP)
    dG += tl.trans(_path_bwd(tl.trans(G), P, L, ww_ptr, pw2_ptr, half, s, fac_a_ptr, vec_a_ptr,
                             pair, pairs, ACC, BP, BL))
    ls = tl.arange(0, BL)
    ps = tl.arange(0, BP)
    tl.store(dg_ptr + ((tt * L + ls[:, None]) * Vc + vv) * P + ps[None, :], dG,
             mask=(ls < L)[:, None] & (ps < P)[None, :])


def _bi_blocks(L: int, P: int, D: int) -> tuple[int, int, int]:
    if max(L, P) > _BI_MAX_N:
        raise ValueError(
            f"bi_isa (triton backend): L = {L} and P = {P} must both be <= {_BI_MAX_N}: the "
            f"[L, L] and [P, P] weight tiles are held whole in registers and shared memory. "
            f"Use the 'reference' backend for larger L or P.")
    bl = max(16, triton.next_power_of_2(L))
    bp = max(16, triton.next_power_of_2(P))
    cap = 128 if triton_interpret() else 32
    return bl, bp, max(16, min(triton.next_power_of_2(D), cap))


def bi_isa_fwd(words, patches, ww, pw, ww2, pw2, tau: float) -> torch.Tensor:
    """words [Bt, L, D], patches [Bv, P, D], weights [L, L], [P, P], [L, L], [P, P] -> [Bt, Bv]."""
    Bt, L, D = words.shape
    Bv, P, _ = patches.shape
    bl, bp, bd = _bi_blocks(L, P, D)
    out = torch.empty(Bt, Bv, device=words.device, dtype=words.dtype)
    if Bt == 0 or Bv == 0:
        return out
    acc, _ = _acc(words)
    args = [x.contiguous() for x in (words, patches, ww, pw, ww2, pw2)]
    s = _scale(tau, words)
    texts = max(1, _MAX_GRID // Bv)         # a launch's grid stays within CUDA's 2**31 - 1
    with device_guard(words):
        for t0 in range(0, Bt, texts):
            nt = min(texts, Bt - t0)
            _bi_isa_fwd_kernel[(nt * Bv,)](*args, out, s, t0, Bv, L, P, D, ACC=acc, BL=bl, BP=bp,
                                           BD=bd, num_warps=_BI_WARPS[0])
    return out


def _bi_chunks(Bt: int, Bv: int, L: int, P: int, itemsize: int) -> tuple[int, int]:
    """(texts, videos) per backward chunk: its buffers (dL/dG and the weight-gradient factors,
    5 L P + 2 (L + P) values per pair) stay within _BI_BWD_BUFFER_BYTES. Square-ish: each
    chunk's GEMMs read and update grad words and grad patches of its texts and videos only,
    so a chunk of few texts by all videos would rewrite all of grad patches every time."""
    pairs = max(1, _BI_BWD_BUFFER_BYTES // ((5 * L * P + 2 * (L + P)) * itemsize))
    tc = _even(Bt, min(Bt, max(1, math.isqrt(pairs))))
    vc = _even(Bv, min(Bv, max(1, pairs // tc)))
    return _even(Bt, min(Bt, max(1, pairs // vc))), vc


def _even(total: int, size: int) -> int:
    """The smallest chunk size that splits `total` into as many chunks as `size` does."""
    return triton.cdiv(total, triton.cdiv(total, size))


def bi_isa_bwd(grad, words, patches, ww, pw, ww2, pw2, tau: float):
    """Gradients of bi_isa_fwd to its six tensors, given grad [Bt, Bv]. Deterministic: the
    kernel writes every value to its own slot, and torch sums them (GEMMs) in an order fixed
    by the shapes."""
    Bt, L, D = words.shape
    Bv, P, _ = patches.shape
    bl, bp, bd = _bi_blocks(L, P, D)
    acc, acc_t = _acc(words)
    args = [x.contiguous() for x in (words, patches, ww, pw, ww2, pw2)]
    dev = words.device
    gwords, gpatches, gww, gpw, gww2, gpw2 = (torch.zeros(x.shape, device=dev, dtype=acc_t)
                                              for x in args)
    if Bt > 0 and Bv > 0:
        grad = grad.contiguous()
        s = _scale(tau, words)
        words_a, patches_a = args[0].to(acc_t), args[1].to(acc_t)
        tc, vc = _bi_chunks(Bt, Bv, L, P, acc_t.itemsize)
        dg, fac_a, fac_b = (torch.empty(k * tc * vc * L * P, device=dev, dtype=acc_t)
                            for k in (1, 2, 2))
        vec_a = torch.empty(2 * tc * vc * P, device=dev, dtype=acc_t)
        vec_b = torch.empty(2 * tc * vc * L, device=dev, dtype=acc_t)
        with device_guard(words):
            for t0 in range(0, Bt, tc):
                nt = min(tc, Bt - t0)
                for v0 in range(0, Bv, vc):
                    nv = min(vc, Bv - v0)
                    pairs = nt * nv
                    _bi_isa_bwd_kernel[(pairs,)](
                        grad, *args, dg, fac_a, vec_a, fac_b, vec_b, s, t0, v0, nv, pairs, Bv, L,
                        P, D, ACC=acc, BL=bl, BP=bp, BD=bd, num_warps=_BI_WARPS[1])
                    d = dg[:nt * L * nv * P].view(nt * L, nv * P)
                    gwords[t0:t0 + nt].view(nt * L, D).addmm_(
                        d, patches_a[v0:v0 + nv].reshape(nv * P, D))
                    gpatches[v0:v0 + nv].view(nv * P, D).addmm_(
                        d.T, words_a[t0:t0 + nt].reshape(nt * L, D))
                    fa = fac_a[:2 * pairs * P * L].view(2, pairs * P, L)
                    fb = fac_b[:2 * pairs * L * P].view(2, pairs * L, P)
                    gww.addmm_(fa[0].T, fa[1])
                    gpw.addmm_(fb[0].T, fb[1])
                    va = vec_a[:2 * pairs * P].view(2, pairs, P)
                    vb = vec_b[:2 * pairs * L].view(2, pairs, L)
                    gpw2.addmm_(va[0].T, va[1])
                    gww2.addmm_(vb[0].T, vb[1])
    return tuple(g.to(x.dtype) for g, x in zip((gwords, gpatches, gww, gpw, gww2, gpw2), args))
