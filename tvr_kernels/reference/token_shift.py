"""Token shift of TS2-Net (SPEC 1), written as the authors' two slice assignments."""
from __future__ import annotations

import torch

from .. import _validate


def check_token_shift_args(x, num_frames, fold_div, offset) -> None:
    _validate.tensor("x", x, ndim=(3, 4), shape_doc="[B*T, N, C] or [B, T, N, C]")
    _validate.integer("num_frames", num_frames, min_value=1)
    _validate.integer("fold_div", fold_div, min_value=1)
    _validate.integer("offset", offset, min_value=0)
    if x.dim() == 3 and x.shape[0] % num_frames != 0:
        raise ValueError(f"x.shape[0] = {x.shape[0]} (B*T) must be divisible by "
                         f"num_frames = {num_frames}")
    if x.dim() == 4 and x.shape[1] != num_frames:
        raise ValueError(f"x is [B, T, N, C] = {tuple(x.shape)}: x.shape[1] must equal "
                         f"num_frames = {num_frames}")
    if x.shape[-2] // fold_div == 0:
        raise ValueError(f"fold = N // fold_div must be >= 1, got N = {x.shape[-2]} tokens "
                         f"(x.shape[-2]) and fold_div = {fold_div}")


def token_shift(x: torch.Tensor, num_frames: int, fold_div: int = 7, offset: int = 3) -> torch.Tensor:
    """Shift whole tokens one frame in time.

    Args:
        x: ``[B*T, N, C]`` (rows ``b*T + t``) or ``[B, T, N, C]``, any float dtype.
        num_frames: ``T``.
        fold_div: ``fold = N // fold_div``; tokens ``1, 1+fold, ...`` read the previous frame.
        offset: tokens ``1+offset, 1+offset+fold, ...`` read the next frame (this wins where
            both sets hold a token). Token 0 never moves; no zero padding at the ends.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    check_token_shift_args(x, num_frames, fold_div, offset)
    N, C = x.shape[-2], x.shape[-1]
    fold = N // fold_div
    # B from the shape, not reshape(-1, ...): with C = 0 the -1 would be ambiguous
    B = x.shape[0] if x.dim() == 4 else x.shape[0] // num_frames
    xv = x.reshape(B, num_frames, N, C)
    out = xv.clone()
    out[:, 1:, 1::fold] = xv[:, :-1, 1::fold]
    out[:, :-1, 1 + offset::fold] = xv[:, 1:, 1 + offset::fold]
    return out.reshape(x.shape)
