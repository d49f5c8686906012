"""Small pieces every op module uses: backend resolution for one call, running a reference's
backward through autograd (the reference backend's backward op), and the autograd formula of
backward ops that have no derivative of their own."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import _backend


def pick(op: str, like: torch.Tensor, backend: str, supported: Sequence[str],
         gpu_default: str = "triton") -> str:
    """Backend for this call of ``op`` on tensors like ``like`` ('' backend = automatic)."""
    return _backend.resolve(op, like.device, backend, supported, gpu_default)


def reference_vjp(fn: Callable, inputs: Sequence[torch.Tensor | None],
                  grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*inputs)`` (a tensor or a tuple of tensors) with respect to each
    floating-point tensor input (None for the other inputs), given the output gradients
    (None for outputs without one). This is the ``reference`` backend of backward ops.

    It uses ``torch.func.vjp`` rather than ``torch.autograd.grad``: custom-op bodies run below
    the ADInplaceOrView key, where autograd mis-tracks the in-place slice assignments the
    references use (as the authors' code does), and functorch's transform is not affected.
    """
    diff = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]

    def f(*xs):
        full = list(inputs)
        for i, x in zip(diff, xs):
            full[i] = x
        return fn(*full)

    out, vjp_fn = torch.func.vjp(f, *[inputs[i] for i in diff])
    if isinstance(out, torch.Tensor):
        cot = grad_outputs[0] if grad_outputs[0] is not None else torch.zeros_like(out)
    else:
        cot = tuple(g if g is not None else torch.zeros_like(o) for o, g in zip(out, grad_outputs))
    grads = vjp_fn(cot)
    res: list[torch.Tensor | None] = [None] * len(inputs)
    for i, g in zip(diff, grads):
        res[i] = g
    return res


def first_order_only(backward_op, op: str) -> None:
    """Give ``backward_op`` (a custom op computing the gradient of ``tvr::<op>``) an autograd
    formula that raises: differentiating it (double backward) is not implemented. Without one,
    torch reports "no autograd formula was registered. Please use register_autograd to add
    one", which reads like a packaging bug rather than a limit of the op."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"tvr::{op}: double backward is not supported (differentiating its gradient again, "
            "as torch.autograd.grad(..., create_graph=True) followed by a backward through "
            "that gradient, gradgradcheck or a Hessian does); only first-order gradients are "
            "implemented")

    backward_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
