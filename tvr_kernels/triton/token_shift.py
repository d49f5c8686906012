"""Token shift (SPEC 1) in Triton: each program moves a [BLOCK_R token rows, BLOCK_C channels]
tile of x [B*T, N, C] (rows = B*T*N); the source frame logic is the transcription of
csrc/include/tvr/token_shift.h."""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from . import device_guard


@triton.jit
def _source_frame(t, n, T, fold, offset):
    fwd = (n >= 1 + offset) & ((n - 1 - offset) % fold == 0)
    bwd = (n >= 1) & ((n - 1) % fold == 0)
    return tl.where(fwd & (t < T - 1), t + 1, tl.where(bwd & (t >= 1), t - 1, t))


@triton.jit
def _tile(rows, C, N: tl.constexpr, T: tl.constexpr, IDX: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's token rows r (with their video-frame row bt, token n, frame t), its
    channel columns, and the in-bounds mask of the [BLOCK_R, BLOCK_C] tile. Row arithmetic in
    IDX (int32 unless rows pass 2**31)."""
    r = tl.program_id(0).to(IDX) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bt = r // N
    mask = (r < rows)[:, None] & (cols < C)[None, :]
    return r, cols, bt, r % N, bt % T, mask


@triton.jit
def _token_shift_fwd_kernel(x_ptr, y_ptr, rows, C, N: tl.constexpr, T: tl.constexpr,
                            fold: tl.constexpr, offset: tl.constexpr, IDX: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, cols, bt, n, t, mask = _tile(rows, C, N, T, IDX, BLOCK_R, BLOCK_C)
    src = (bt - t + _source_frame(t, n, T, fold, offset)) * N + n
    v = tl.load(x_ptr + src.to(tl.int64)[:, None] * C + cols[None, :], mask=mask)
    tl.store(y_ptr + r.to(tl.int64)[:, None] * C + cols[None, :], v, mask=mask)


@triton.jit
def _token_shift_bwd_kernel(g_ptr, gx_ptr, rows, C, N: tl.constexpr, T: tl.constexpr,
                            fold: tl.constexpr, offset: tl.constexpr, IDX: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, cols, bt, n, t, mask = _tile(rows, C, N, T, IDX, BLOCK_R, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    # Output frames t-1, t, t+1 are the only ones that can read input frame t.
    for d in tl.static_range(3):
        tp = t + d - 1
        hit = (tp >= 0) & (tp < T) & (_source_frame(tp, n, T, fold, offset) == t)
        src = (bt - t + tp) * N + n
        v = tl.load(g_ptr + src.to(tl.int64)[:, None] * C + cols[None, :], mask=mask & hit[:, None],
                    other=0.0)
        acc += v.to(ACC)
    tl.store(gx_ptr + r.to(tl.int64)[:, None] * C + cols[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=mask)


def _gpu_blocks(rows: int, C: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) on a GPU for a pure copy. Tiles of 16 KiB over 4 warps:
    each thread moves 8 16-byte vectors (LDG.E.128 / STG.E.128 where C * itemsize is a
    multiple of 16, as at C = 768), 8 independent loads in flight per thread at 48 registers
    (forward; backward 80-94), so ~10 programs fit an SM: meant for >= 80% of copy bandwidth
    on an H100. Checked by compiling for sm_80/sm_90 (no spills, vector width), not yet timed
    on a GPU. 256 channels divide the ViT widths 768 and 1024: no partly masked column block."""
    block_c = min(triton.next_power_of_2(C), 256)
    block_r = min(triton.next_power_of_2(rows), max(1, 16384 // (block_c * itemsize)))
    return block_r, block_c, 4


def _blocks(rows: int, C: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for `rows` token rows of C channels."""
    if triton_interpret():  # each program instance costs milliseconds: few, large programs
        return min(triton.next_power_of_2(rows), 64), triton.next_power_of_2(C), 4
    return _gpu_blocks(rows, C, itemsize)


# Row arithmetic (token, frame, source row) runs in int32 below this many rows: in int64 the
# divisions by N and T take ~1.6x the instructions of a whole forward program.
_INT32_ROWS = 2**31


def _launch(kernel, src: torch.Tensor, num_frames: int, fold_div: int, offset: int, **extra):
    """N, T, fold and offset are constexprs: the per-row divisions and modulos by them become
    multiply-shifts. A thread of the [192, 50, 768] float32 forward (8 rows, 8 16-byte vectors)
    runs 344 SASS instructions on sm_90; 544 with int64 row arithmetic, 912 with runtime int64
    divisors. Each model has one or two (N, T) pairs, each compiled once.
    The grid has one program per 16 KiB, so axis 0 stays far below 2**31 for any tensor that
    fits in memory; axis 1 is cdiv(C, 256)."""
    src = src.contiguous()
    out = torch.empty_like(src)
    _, N, C = src.shape
    rows = src.shape[0] * N
    if rows == 0 or C == 0:
        return out
    br, bc, nw = _blocks(rows, C, src.element_size())
    grid = (triton.cdiv(rows, br), triton.cdiv(C, bc))
    if grid[1] > 65535:
        raise ValueError(f"token_shift (triton): C = {C} channels exceed the CUDA grid's y limit "
                         f"({65535 * bc})")
    idx = tl.int32 if rows + br <= _INT32_ROWS else tl.int64
    with device_guard(src):
        kernel[grid](src, out, rows, C, N, num_frames, N // fold_div, offset, IDX=idx, **extra,
                     BLOCK_R=br, BLOCK_C=bc, num_warps=nw)
    return out


def token_shift_fwd(x: torch.Tensor, num_frames: int, fold_div: int, offset: int) -> torch.Tensor:
    """x: [B*T, N, C] -> shifted copy."""
    return _launch(_token_shift_fwd_kernel, x, num_frames, fold_div, offset)


def token_shift_bwd(grad: torch.Tensor, num_frames: int, fold_div: int, offset: int) -> torch.Tensor:
    """grad of the output [B*T, N, C] -> grad of the input."""
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
    return _launch(_token_shift_bwd_kernel, grad, num_frames, fold_div, offset, ACC=acc)
