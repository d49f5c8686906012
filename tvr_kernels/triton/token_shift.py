"""Token shift (SPEC 1) in Triton: each program moves a [BLOCK_R token rows, BLOCK_C channels]
tile; the source frame logic is the transcription of csrc/include/tvr/token_shift.h."""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpret


@triton.jit
def _source_frame(t, n, T, fold, offset):
    fwd = (n >= 1 + offset) & ((n - 1 - offset) % fold == 0)
    bwd = (n >= 1) & ((n - 1) % fold == 0)
    return tl.where(fwd & (t < T - 1), t + 1, tl.where(bwd & (t >= 1), t - 1, t))


@triton.jit
def _tile(rows, N, C, T, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's token rows r (with their video-frame row bt, token n, frame t), its
    channel columns, and the in-bounds mask of the [BLOCK_R, BLOCK_C] tile."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bt = r // N
    mask = (r < rows)[:, None] & (cols < C)[None, :]
    return r, cols, bt, r % N, bt % T, mask


@triton.jit
def _token_shift_fwd_kernel(x_ptr, y_ptr, rows, N, C, T, fold, offset,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, cols, bt, n, t, mask = _tile(rows, N, C, T, BLOCK_R, BLOCK_C)
    src = (bt - t + _source_frame(t, n, T, fold, offset)) * N + n
    v = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=mask)
    tl.store(y_ptr + r[:, None] * C + cols[None, :], v, mask=mask)


@triton.jit
def _token_shift_bwd_kernel(g_ptr, gx_ptr, rows, N, C, T, fold, offset, ACC: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, cols, bt, n, t, mask = _tile(rows, N, C, T, BLOCK_R, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    # Output frames t-1, t, t+1 are the only ones that can read input frame t.
    for d in tl.static_range(3):
        tp = t + d - 1
        hit = (tp >= 0) & (tp < T) & (_source_frame(tp, n, T, fold, offset) == t)
        src = (bt - t + tp) * N + n
        v = tl.load(g_ptr + src[:, None] * C + cols[None, :], mask=mask & hit[:, None], other=0.0)
        acc += v.to(ACC)
    tl.store(gx_ptr + r[:, None] * C + cols[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _blocks(rows: int, C: int) -> tuple[int, int]:
    if triton_interpret():  # each program instance costs milliseconds: few, large programs
        return min(triton.next_power_of_2(rows), 64), triton.next_power_of_2(C)
    block_c = min(triton.next_power_of_2(C), 512)
    return max(1, 4096 // block_c), block_c


def _launch(kernel, src: torch.Tensor, num_frames: int, fold_div: int, offset: int, **extra):
    src = src.contiguous()
    out = torch.empty_like(src)
    _, N, C = src.shape
    rows = src.shape[0] * N
    if rows == 0 or C == 0:
        return out
    br, bc = _blocks(rows, C)
    grid = (triton.cdiv(rows, br), triton.cdiv(C, bc))
    kernel[grid](src, out, rows, N, C, num_frames, N // fold_div, offset, **extra,
                 BLOCK_R=br, BLOCK_C=bc)
    return out


def token_shift_fwd(x: torch.Tensor, num_frames: int, fold_div: int, offset: int) -> torch.Tensor:
    """x: [B*T, N, C] -> shifted copy."""
    return _launch(_token_shift_fwd_kernel, x, num_frames, fold_div, offset)


def token_shift_bwd(grad: torch.Tensor, num_frames: int, fold_div: int, offset: int) -> torch.Tensor:
    """grad of the output [B*T, N, C] -> grad of the input."""
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
    return _launch(_token_shift_bwd_kernel, grad, num_frames, fold_div, offset, ACC=acc)
