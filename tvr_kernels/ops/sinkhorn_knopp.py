"""``tvr::sinkhorn_knopp``: registration, autograd and backend choice (SPEC 4).

Kernels: csrc/cpu/sinkhorn_knopp.cpp (cpp), tvr_kernels/triton/sinkhorn_knopp.py (triton);
reference: tvr_kernels/reference/sinkhorn_knopp.py.

The op returns, besides the two biases, the log-potential histories ``f_hist [T, Nq]`` and
``g_hist [T+1, Nv]`` (float32, float64 for float64 logits). They are what the analytic backward
needs (O(T (Nq + Nv)) memory instead of the autograd graph of T products with ``exp(logits)``);
the public function drops them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..reference.sinkhorn_knopp import _compute_dtype, check_sinkhorn_knopp_args
from ..reference.sinkhorn_knopp import sinkhorn_knopp as _reference
from ..reference.sinkhorn_knopp import sinkhorn_potentials as _reference_potentials
from ._common import first_order_only, pick, reference_vjp

_SUPPORTED = ("reference", "cpp", "triton")

NONFINITE_MESSAGE = ("sinkhorn_knopp: logits contain NaN or +-inf; only finite logits are "
                     "supported (mask by a large finite negative value instead of -inf)")


def check_finite(logits: Tensor) -> None:
    """Raise ValueError on non-finite logits (op bodies only: reads the data, so it must not
    be traced; the cpp kernel does the same check inside its first pass)."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(NONFINITE_MESSAGE)


def biases(f_hist: Tensor, g_hist: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(log_softmax(f_T), log_softmax(g_T))`` in ``dtype``."""
    return (torch.log_softmax(f_hist[-1], 0).to(dtype), torch.log_softmax(g_hist[-1], 0).to(dtype))


@torch.library.custom_op("tvr::sinkhorn_knopp", mutates_args=())
def _sinkhorn_knopp(logits: Tensor, n_iters: int, log_domain: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = pick("sinkhorn_knopp", logits, backend, _SUPPORTED)
    if impl == "cpp":
        f_hist, g_hist = torch.ops.tvr_C.sinkhorn_knopp_fwd(logits, n_iters, log_domain)
    else:
        check_finite(logits)
        if impl == "reference":
            f_hist, g_hist = _reference_potentials(logits, n_iters, log_domain)
        else:
            from ..triton.sinkhorn_knopp import sinkhorn_knopp_fwd
            f_hist, g_hist = sinkhorn_knopp_fwd(logits, n_iters, log_domain)
    row, col = biases(f_hist, g_hist, logits.dtype)
    return row, col, f_hist, g_hist


@_sinkhorn_knopp.register_fake
def _(logits, n_iters, log_domain, backend):
    Nq, Nv = logits.shape
    acc = _compute_dtype(logits.dtype)
    return (logits.new_empty(Nq), logits.new_empty(Nv), logits.new_empty((n_iters, Nq), dtype=acc),
            logits.new_empty((n_iters + 1, Nv), dtype=acc))


def _input_grads(grad_row: Tensor, grad_col: Tensor, f_hist: Tensor,
                 g_hist: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of f_T and g_T through the final log_softmax, in the histories' dtype
    (softmax recomputed from the potentials, not from the possibly half-precision biases)."""
    dr, dc = grad_row.to(f_hist.dtype), grad_col.to(g_hist.dtype)
    dF = dr - torch.softmax(f_hist[-1], 0) * dr.sum()
    dG = dc - torch.softmax(g_hist[-1], 0) * dc.sum()
    return dF, dG


@torch.library.custom_op("tvr::sinkhorn_knopp_backward", mutates_args=())
def _sinkhorn_knopp_backward(grad_row: Tensor, grad_col: Tensor, logits: Tensor, f_hist: Tensor,
                             g_hist: Tensor, n_iters: int, log_domain: bool,
                             backend: str) -> Tensor:
    impl = pick("sinkhorn_knopp", logits, backend, _SUPPORTED)
    if impl == "reference":
        (gl,) = reference_vjp(lambda x: _reference(x, n_iters, log_domain=log_domain),
                              [logits], [grad_row, grad_col])
        return gl
    dF, dG = _input_grads(grad_row, grad_col, f_hist, g_hist)
    if impl == "triton":
        from ..triton.sinkhorn_knopp import sinkhorn_knopp_bwd
        return sinkhorn_knopp_bwd(logits, f_hist, g_hist, dF, dG)
    return torch.ops.tvr_C.sinkhorn_knopp_bwd(logits, f_hist, g_hist, dF, dG)


@_sinkhorn_knopp_backward.register_fake
def _(grad_row, grad_col, logits, f_hist, g_hist, n_iters, log_domain, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, ctx.n_iters, ctx.log_domain, ctx.backend = inputs
    row, col, f_hist, g_hist = output
    ctx.mark_non_differentiable(f_hist, g_hist)
    ctx.save_for_backward(logits, f_hist, g_hist)


def _backward(ctx, grad_row, grad_col, _grad_f, _grad_g):
    logits, f_hist, g_hist = ctx.saved_tensors
    Nq, Nv = logits.shape
    if grad_row is None:
        grad_row = logits.new_zeros(Nq)
    if grad_col is None:
        grad_col = logits.new_zeros(Nv)
    gl = torch.ops.tvr.sinkhorn_knopp_backward(grad_row, grad_col, logits, f_hist, g_hist,
                                               ctx.n_iters, ctx.log_domain, ctx.backend)
    return gl, None, None, None


_sinkhorn_knopp.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_sinkhorn_knopp_backward, "sinkhorn_knopp")


def sinkhorn_knopp(logits: Tensor, n_iters: int = 4, *,
                   log_domain: bool = False) -> tuple[Tensor, Tensor]:
    """Row and column biases of ``n_iters`` Sinkhorn-Knopp iterations (UCoFiA), fused.

    Args:
        logits: ``[Nq, Nv]`` float, finite (UCoFiA: a bank of training texts x the test
            videos, similarities times the logit scale 100).
        n_iters: number of ``(a, b)`` updates, >= 1.
        log_domain: False = the authors' probability-domain iteration (``K = exp(logits -
            max)``, ``a = 1/(K b)``, ``b = 1/(a K)``). Its quirk is kept: for a float32 logit
            range above ~88 (~104 with denormals) whole columns of ``K`` underflow and the
            result is inf/NaN, as in the authors' code. True = the same iteration with
            log-sum-exp updates: equal where the former is finite, finite for any finite
            logits. Use it whenever the logit range may exceed ~80.

    Returns:
        ``(row_bias [Nq], col_bias [Nv])`` in ``logits.dtype``: ``log_softmax(log a)`` and
        ``log_softmax(log b - max(logits))``. Differentiable with respect to ``logits``
        through the unrolled iterations (analytic backward; saves O(n_iters (Nq + Nv))).

    Raises:
        ValueError: bad shapes / arguments (before any kernel), or logits holding NaN or
            +-inf (found by the kernels, so at call time even under ``torch.compile``). The
            pure reference ``tvr_kernels.reference.sinkhorn_knopp`` instead propagates them
            (its result is then NaN).

    Example::

        row_bias, col_bias = tk.sinkhorn_knopp(100 * text_bank @ videos.T, log_domain=True)
    """
    check_sinkhorn_knopp_args(logits, n_iters, log_domain)
    row, col, _, _ = torch.ops.tvr.sinkhorn_knopp(logits, n_iters, log_domain,
                                                  _backend.requested_backend())
    return row, col
