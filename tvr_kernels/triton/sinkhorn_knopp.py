"""Sinkhorn-Knopp (SPEC 4) in Triton. Same algorithm and notation as
csrc/cpu/sinkhorn_knopp.cpp (read its header comment): log-potentials f [Nq], g [Nv] with the
plans P = exp(L + f + g), rows summing to Nv / Nq after a row update (kappa = ln(Nv / Nq): the
reference's ``row_mass``, which keeps f and g from drifting), one kernel launch per pass over
the logits.

Each program owns BLOCK_R rows and walks the columns in BLOCK_V chunks twice: the first walk
reduces its rows (online max / sum-exp, so any Nv works), the second adds the rows' share of
the column sums. The second walk re-reads the same row tile, which a GPU serves from L2; the
logits are read from DRAM once per pass. Column sums are written as per-program partials
[n_programs, Nv] and reduced by torch (deterministic, no atomics). The global max, the
column maxima of the log domain's first pass, the finite check (in the op) and the O(Nq + Nv)
vector updates between passes are torch ops. The backward is the same analytic reverse pass as
the C++ one (two exps per logit per step; the C++ kernel's one-exp ratio trick is not ported).
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from ..reference.sinkhorn_knopp import row_mass
from . import device_guard


@triton.jit
def _row_block(Nq, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows, clamped to Nq - 1, and which of them are real.

    Loads use the clamped rows and so need no row mask: rows past Nq re-read row Nq - 1 (from
    L1/L2) and are zeroed where they would count (their exp scale is -inf / 0, their dF is 0),
    and only stores are row-masked. Per-row predicates kept live across the column loops are
    what made ptxas spill (it has 7 predicate registers)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32: r < Nq + BLOCK_R < 2**31
    return tl.minimum(r, Nq - 1).to(tl.int64), r < Nq


@triton.jit
def _logit_tile(L_ptr, rows, v0, Nv, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """The [BLOCK_R, BLOCK_V] tile of the logits at columns v0.. of the (clamped) `rows`, in
    ACC (0 in columns past Nv), with its columns, column mask and flat offsets."""
    cols = v0 + tl.arange(0, BLOCK_V)
    cmask = cols < Nv
    offs = rows[:, None] * Nv + cols[None, :]
    x = tl.load(L_ptr + offs, mask=cmask[None, :], other=0.0).to(ACC)
    return cols, cmask, offs, x


# Values in columns past Nv are garbage (even inf/NaN) in every kernel below: each column's
# sum only reads its own column and those columns are never stored, so only row reductions
# mask them.


@triton.jit
def _colsum_kernel(L_ptr, shift_ptr, part_ptr, Nq, Nv,
                   PER_COL: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """part[pid, j] = sum over this program's rows of exp(L_ij - shift) (shift = m: shift_ptr
    holds one value; PER_COL: shift_j, the log domain passes the column maxima)."""
    pid = tl.program_id(0).to(tl.int64)  # for the partials' offsets pid * Nv
    rows, real = _row_block(Nq, BLOCK_R)
    rshift = tl.where(real, 0.0, -float("inf")).to(ACC)  # exp(... + rshift) = 0 past Nq
    for v0 in range(0, Nv, BLOCK_V):
        cols, cmask, offs, x = _logit_tile(L_ptr, rows, v0, Nv, ACC, BLOCK_V)
        if PER_COL:
            sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
            e = tl.exp(x - sh[None, :] + rshift[:, None])
        else:
            e = tl.exp(x - tl.load(shift_ptr) + rshift[:, None])
        tl.store(part_ptr + pid * Nv + cols, tl.sum(e, axis=0), mask=cmask)


@triton.jit
def _iter_kernel(L_ptr, vec_ptr, f_ptr, part_ptr, c_ptr, Nq, Nv,
                 LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """One (a, b) update over BLOCK_R rows; c = (max L, kappa (LOG) or Nv / Nq (else)).
    LOG:  vec = g_{t-1}; h_i = -LSE_j(L_ij + g_j); f_i = kappa + h_i;
          part[pid, j] = sum_i exp(L_ij + g_j + h_i)   (the row-stochastic plan);
    else: vec = b;       a_i = (Nv / Nq) / sum_j exp(L_ij - m) b_j; f_i = log a_i;
          part[pid, j] = sum_i a_i exp(L_ij - m)   (the authors' a @ K)."""
    pid = tl.program_id(0).to(tl.int64)  # for the partials' offsets pid * Nv
    rows, real = _row_block(Nq, BLOCK_R)
    # c: a pointer, not scalar arguments: Python floats pass as float32. The log domain loads
    # kappa after walk 1: loaded here, ptxas gave the kernel 182 registers instead of 128 on
    # sm_90 (float32, [45000, 1000]): one program per SM instead of two. The probability
    # domain's loads stay here (after walk 1: 128 -> 155 registers on sm_80).
    if not LOG:
        m = tl.load(c_ptr)
        ratio = tl.load(c_ptr + 1)
    # walk 1: row reductions
    rmax = tl.full((BLOCK_R,), -float("inf"), ACC)
    s = tl.zeros((BLOCK_R,), ACC)
    for v0 in range(0, Nv, BLOCK_V):
        cols, cmask, offs, x = _logit_tile(L_ptr, rows, v0, Nv, ACC, BLOCK_V)
        vec = tl.load(vec_ptr + cols, mask=cmask, other=0.0)
        if LOG:
            # every chunk holds a real column, so new_max is finite (rows are all real
            # logits) and the first chunk's exp(-inf - new_max) zeroes the empty sum
            v = tl.where(cmask[None, :], x + vec[None, :], -float("inf"))
            new_max = tl.maximum(rmax, tl.max(v, axis=1))
            s = s * tl.exp(rmax - new_max) + tl.sum(tl.exp(v - new_max[:, None]), axis=1)
            rmax = new_max
        else:
            k = tl.where(cmask[None, :], tl.exp(x - m), 0.0)
            s += tl.sum(k * vec[None, :], axis=1)
    if LOG:
        h = -(rmax + tl.log(s))
        f = tl.load(c_ptr + 1) + h
        w = tl.where(real, h, -float("inf"))  # walk 2's exp scale: 0 for rows past Nq
    else:
        a = ratio / s
        f = tl.log(a)
        w = tl.where(real, a, 0.0)
    tl.store(f_ptr + rows, f, mask=real)
    # walk 2: this tile's share of the column sums
    for v0 in range(0, Nv, BLOCK_V):
        cols, cmask, offs, x = _logit_tile(L_ptr, rows, v0, Nv, ACC, BLOCK_V)
        vec = tl.load(vec_ptr + cols, mask=cmask, other=0.0)
        if LOG:
            p = tl.exp(x + vec[None, :] + w[:, None])
        else:
            p = w[:, None] * tl.exp(x - m)
        tl.store(part_ptr + pid * Nv + cols, tl.sum(p, axis=0), mask=cmask)


@triton.jit
def _bwd_kernel(L_ptr, f_ptr, gt_ptr, gp_ptr, dgt_ptr, dfin_ptr, dL_ptr, part_ptr, Nq, Nv,
                FIRST: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Backward of step t over BLOCK_R rows (see csrc/cpu/sinkhorn_knopp.cpp):
    dF_i = dFin_i - sum_j Pg_ij dG_j;  dL -= dG Pg + dF Pf;  part[pid, j] = -sum_i dF_i Pf_ij."""
    pid = tl.program_id(0).to(tl.int64)  # for the partials' offsets pid * Nv
    rows, real = _row_block(Nq, BLOCK_R)
    f = tl.load(f_ptr + rows)
    dot = tl.zeros((BLOCK_R,), ACC)
    for v0 in range(0, Nv, BLOCK_V):
        cols, cmask, offs, x = _logit_tile(L_ptr, rows, v0, Nv, ACC, BLOCK_V)
        gt = tl.load(gt_ptr + cols, mask=cmask, other=0.0)
        dg = tl.load(dgt_ptr + cols, mask=cmask, other=0.0)
        pg = tl.where(cmask[None, :], tl.exp(x + f[:, None] + gt[None, :]), 0.0)
        dot += tl.sum(pg * dg[None, :], axis=1)
    if FIRST:
        df = tl.load(dfin_ptr + rows) - dot
    else:
        df = -dot
    df = tl.where(real, df, 0.0)  # rows past Nq add nothing to the column partials
    for v0 in range(0, Nv, BLOCK_V):
        cols, cmask, offs, x = _logit_tile(L_ptr, rows, v0, Nv, ACC, BLOCK_V)
        gt = tl.load(gt_ptr + cols, mask=cmask, other=0.0)
        gp = tl.load(gp_ptr + cols, mask=cmask, other=0.0)
        dg = tl.load(dgt_ptr + cols, mask=cmask, other=0.0)
        pg = tl.exp(x + f[:, None] + gt[None, :])
        pf = tl.exp(x + f[:, None] + gp[None, :])
        d = -dg[None, :] * pg - df[:, None] * pf
        if not FIRST:
            d += tl.load(dL_ptr + offs, mask=cmask[None, :], other=0.0)
        # rows past Nq alias row Nq - 1 with other values: they must not store
        tl.store(dL_ptr + offs, d, mask=real[:, None] & cmask[None, :])
        tl.store(part_ptr + pid * Nv + cols, -tl.sum(df[:, None] * pf, axis=0), mask=cmask)


@triton.jit
def _bwd0_kernel(L_ptr, g0_ptr, dg0_ptr, dL_ptr, Nq, Nv,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """dL -= dG0 exp(L + g0) (the initial column normalisation)."""
    rows, real = _row_block(Nq, BLOCK_R)
    for v0 in range(0, Nv, BLOCK_V):
        cols, cmask, offs, x = _logit_tile(L_ptr, rows, v0, Nv, ACC, BLOCK_V)
        g0 = tl.load(g0_ptr + cols, mask=cmask, other=0.0)
        dg = tl.load(dg0_ptr + cols, mask=cmask, other=0.0)
        d = tl.load(dL_ptr + offs, mask=cmask[None, :], other=0.0) - dg[None, :] * tl.exp(x + g0[None, :])
        tl.store(dL_ptr + offs, d, mask=real[:, None] & cmask[None, :])


def _gpu_blocks(Nq: int, Nv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) on a GPU. Checked by compiling for sm_80/sm_90 (ptxas -v),
    not yet timed on a GPU:

    * BLOCK_R = 32 keeps the column partials [cdiv(Nq, 32), Nv] (float32) at 1/32 of the
      logits' elements: ~6% extra traffic for float32 logits (written once, summed once).
    * A thread holds 16 logits of a tile (8 in float64, whose values take two registers):
      16 independent row loads in flight per thread, and no spills at [45000, 1000] (sm_90:
      80-199 registers; float64 at 16 would need up to 254, at 8 it needs <= 160).
    * Few resident programs, so that walk 2 finds its row tile in L2: a tile is 32 x Nv
      logits (125 KiB in float32 at Nv = 1000), and the iteration kernel's 128 registers x
      256 threads leave 2 programs per SM: ~33 MB between a tile's two reads on 132 SMs
      (H100/H200 L2: 50 MB). Smaller, more numerous programs would evict it first.
    Narrower tiles (small Nv or Nq) get fewer warps at the same logits per thread.
    """
    per_thread = 8 if dtype == torch.float64 else 16
    block_r = min(32, triton.next_power_of_2(Nq))
    block_v = min(triton.next_power_of_2(Nv), 8 * per_thread)
    num_warps = max(1, min(8, block_r * block_v // (32 * per_thread)))
    return block_r, block_v, num_warps


def _blocks(Nq: int, Nv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) for logits [Nq, Nv] of `dtype`."""
    if triton_interpret():  # each program instance costs milliseconds: few, large programs
        return min(triton.next_power_of_2(Nq), 64), min(triton.next_power_of_2(Nv), 128), 4
    return _gpu_blocks(Nq, Nv, dtype)


def _acc(dtype: torch.dtype):
    """Accumulation dtype: float64 for float64 logits, else float32 (torch and tl)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def sinkhorn_knopp_fwd(logits: torch.Tensor, n_iters: int,
                       log_domain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [Nq, Nv] -> (f_hist [n_iters, Nq], g_hist [n_iters + 1, Nv]) in the accumulation dtype."""
    L = logits.contiguous()
    acc, ACC = _acc(L.dtype)
    Nq, Nv = L.shape
    br, bv, nw = _blocks(Nq, Nv, L.dtype)
    n_prog = triton.cdiv(Nq, br)
    cfg = dict(ACC=ACC, BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
    part = torch.empty((n_prog, Nv), device=L.device, dtype=acc)
    f_hist = torch.empty((n_iters, Nq), device=L.device, dtype=acc)
    g_hist = torch.empty((n_iters + 1, Nv), device=L.device, dtype=acc)
    ratio, kappa = row_mass(Nq, Nv)
    consts = torch.empty(2, device=L.device, dtype=acc)  # (m, row mass) for _iter_kernel
    consts[0] = L.max()
    consts[1] = kappa if log_domain else ratio
    m = consts[:1]
    with device_guard(L):
        if log_domain:
            cmax = L.amax(0).to(acc)
            _colsum_kernel[(n_prog,)](L, cmax, part, Nq, Nv, PER_COL=True, **cfg)
            g_hist[0] = -(cmax + part.sum(0).log())
        else:
            _colsum_kernel[(n_prog,)](L, m, part, Nq, Nv, PER_COL=False, **cfg)
            b = 1.0 / part.sum(0)
            g_hist[0] = b.log() - m
        for t in range(1, n_iters + 1):
            if log_domain:
                _iter_kernel[(n_prog,)](L, g_hist[t - 1], f_hist[t - 1], part, consts, Nq, Nv,
                                        LOG=True, **cfg)
                g_hist[t] = g_hist[t - 1] - kappa - part.sum(0).log()
            else:
                _iter_kernel[(n_prog,)](L, b, f_hist[t - 1], part, consts, Nq, Nv, LOG=False,
                                        **cfg)
                b = 1.0 / part.sum(0)
                g_hist[t] = b.log() - m
    return f_hist, g_hist


def sinkhorn_knopp_bwd(logits: torch.Tensor, f_hist: torch.Tensor, g_hist: torch.Tensor,
                       dF: torch.Tensor, dG: torch.Tensor) -> torch.Tensor:
    """Gradient of the logits [Nq, Nv] given dF [Nq], dG [Nv] (gradients of f_T, g_T)."""
    L = logits.contiguous()
    acc, ACC = _acc(L.dtype)
    Nq, Nv = L.shape
    T = f_hist.shape[0]
    br, bv, nw = _blocks(Nq, Nv, L.dtype)
    n_prog = triton.cdiv(Nq, br)
    cfg = dict(ACC=ACC, BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
    f_hist, g_hist = f_hist.to(acc).contiguous(), g_hist.to(acc).contiguous()
    # g_{t-1} - kappa makes the row-update plan exp(L + f_t + g_{t-1} - kappa) row-stochastic,
    # which is what the backward of f_t = kappa - LSE_j(L + g_{t-1}) multiplies by
    g_rows = g_hist - row_mass(Nq, Nv)[1]
    dF, dg = dF.to(acc).contiguous(), dG.to(acc).contiguous()
    part = torch.empty((n_prog, Nv), device=L.device, dtype=acc)
    dL = torch.empty((Nq, Nv), device=L.device, dtype=acc)
    with device_guard(L):
        for t in range(T, 0, -1):
            _bwd_kernel[(n_prog,)](L, f_hist[t - 1], g_hist[t], g_rows[t - 1], dg, dF, dL, part,
                                   Nq, Nv, FIRST=t == T, **cfg)
            dg = part.sum(0)
        _bwd0_kernel[(n_prog,)](L, g_hist[0], dg, dL, Nq, Nv, **cfg)
    return dL.to(logits.dtype)
