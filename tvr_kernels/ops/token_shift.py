"""``tvr::token_shift``: registration, autograd and backend choice (SPEC 1).

Kernels: csrc/cpu/token_shift.cpp (cpp), csrc/cuda/token_shift.cu (cuda),
tvr_kernels/triton/token_shift.py (triton); reference: tvr_kernels/reference/token_shift.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..reference.token_shift import check_token_shift_args
from ..reference.token_shift import token_shift as _reference
from ._common import pick, reference_vjp

_SUPPORTED = ("reference", "cpp", "triton", "cuda")


@torch.library.custom_op("tvr::token_shift", mutates_args=())
def _token_shift(x: Tensor, num_frames: int, fold_div: int, offset: int, backend: str) -> Tensor:
    impl = pick("token_shift", x, backend, _SUPPORTED, gpu_default="cuda")
    if impl == "reference":
        return _reference(x, num_frames, fold_div, offset)
    if impl == "triton":
        from ..triton.token_shift import token_shift_fwd
        return token_shift_fwd(x, num_frames, fold_div, offset)
    return torch.ops.tvr_C.token_shift_fwd(x, num_frames, fold_div, offset)


@_token_shift.register_fake
def _(x, num_frames, fold_div, offset, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("tvr::token_shift_backward", mutates_args=())
def _token_shift_backward(grad: Tensor, num_frames: int, fold_div: int, offset: int,
                          backend: str) -> Tensor:
    impl = pick("token_shift", grad, backend, _SUPPORTED, gpu_default="cuda")
    if impl == "reference":
        (gx,) = reference_vjp(lambda x: _reference(x, num_frames, fold_div, offset),
                              [torch.empty_like(grad)], [grad])
        return gx
    if impl == "triton":
        from ..triton.token_shift import token_shift_bwd
        return token_shift_bwd(grad, num_frames, fold_div, offset)
    return torch.ops.tvr_C.token_shift_bwd(grad, num_frames, fold_div, offset)


@_token_shift_backward.register_fake
def _(grad, num_frames, fold_div, offset, backend):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.num_frames, ctx.fold_div, ctx.offset, ctx.backend = inputs


def _backward(ctx, grad):
    gx = torch.ops.tvr.token_shift_backward(grad, ctx.num_frames, ctx.fold_div, ctx.offset,
                                            ctx.backend)
    return gx, None, None, None, None


_token_shift.register_autograd(_backward, setup_context=_setup_context)


def _backward_backward(ctx, grad_gx):
    # The backward is linear in `grad` (the transposed gather), so its derivative is the
    # forward gather again, whose own backward is the backward op: every order of
    # derivative works, on the forward's backend.
    gg = torch.ops.tvr.token_shift(grad_gx, ctx.num_frames, ctx.fold_div, ctx.offset,
                                   ctx.backend)
    return gg, None, None, None, None


# Same (tensor, num_frames, fold_div, offset, backend) inputs as the forward: same context.
_token_shift_backward.register_autograd(_backward_backward, setup_context=_setup_context)


def token_shift(x: Tensor, num_frames: int, fold_div: int = 7, offset: int = 3) -> Tensor:
    """Shift whole tokens one frame in time (TS2-Net), fused.

    Args:
        x: ``[B*T, N, C]`` (rows ordered ``b*T + t``) or ``[B, T, N, C]``; any float dtype;
            non-contiguous input is copied to contiguous first.
        num_frames: ``T``.
        fold_div: ``fold = N // fold_div``. Tokens ``range(1, N, fold)`` of frame ``t >= 1``
            take frame ``t-1``'s.
        offset: tokens ``range(1 + offset, N, fold)`` of frame ``t <= T-2`` take frame
            ``t+1``'s; this wins where both sets hold a token. Token 0 (CLS) never moves and
            the end frames keep their own tokens (no zero padding).

    Returns:
        Tensor of ``x``'s shape and dtype. Bit-exact with
        ``tvr_kernels.reference.token_shift`` in forward and backward. Differentiable to any
        order (the backward is a shift too).

    Example::

        y = tk.token_shift(torch.randn(16 * 12, 50, 768), num_frames=12)
    """
    check_token_shift_args(x, num_frames, fold_div, offset)
    x3 = x.flatten(0, 1) if x.dim() == 4 else x  # not reshape(-1, N, C): ambiguous at C = 0
    y = torch.ops.tvr.token_shift(x3, num_frames, fold_div, offset, _backend.requested_backend())
    return y.reshape(x.shape)
