"""``tvr::isa`` and ``tvr::bi_isa``: registration, autograd and backend choice (SPEC 3).

Kernels: csrc/cpu/isa.cpp (cpp), tvr_kernels/triton/isa.py (triton); math of one row in
csrc/include/tvr/isa.h; reference: tvr_kernels/reference/isa.py.

The fused Bi-ISA kernels never hold the full ``G`` ``[Bt, L, Bv, P]``: the C++ kernel works on
bounded blocks of (text, video) pairs and Triton on one pair per program, so a 1000 x 1000
evaluation needs no chunking by the caller. Backward recomputes the tiles of ``G``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..reference.isa import bi_isa as _reference_bi_isa
from ..reference.isa import check_bi_isa_args, check_isa_args
from ..reference.isa import isa as _reference_isa
from ._common import first_order_only, pick, reference_vjp

_SUPPORTED = ("reference", "cpp", "triton")


def _rows(sim: Tensor, dim: int) -> Tensor:
    """``sim`` with axis ``dim`` moved last and the rest flattened: ``[R, n]`` contiguous."""
    return sim.movedim(dim, -1).reshape(-1, sim.shape[dim]).contiguous()


def _reduced_shape(sim: Tensor, dim: int) -> list[int]:
    return [s for i, s in enumerate(sim.shape) if i != dim % sim.dim()]


# --------------------------------------------------------------------------------------------
# isa

@torch.library.custom_op("tvr::isa", mutates_args=())
def _isa(sim: Tensor, weight: Tensor, dim: int, tau: float, backend: str) -> Tensor:
    impl = pick("isa", sim, backend, _SUPPORTED)
    if impl == "reference":
        return _reference_isa(sim, weight, dim, tau)
    x = _rows(sim, dim)
    if impl == "triton":
        from ..triton.isa import isa_fwd
        y = isa_fwd(x, weight.contiguous(), tau)
    else:
        y = torch.ops.tvr_C.isa_fwd(x, weight, tau)
    return y.reshape(_reduced_shape(sim, dim))


@_isa.register_fake
def _(sim, weight, dim, tau, backend):
    return sim.new_empty(_reduced_shape(sim, dim))


@torch.library.custom_op("tvr::isa_backward", mutates_args=())
def _isa_backward(grad: Tensor, sim: Tensor, weight: Tensor, dim: int, tau: float,
                  backend: str) -> tuple[Tensor, Tensor]:
    impl = pick("isa", sim, backend, _SUPPORTED)
    if impl == "reference":
        gs, gw = reference_vjp(lambda s, w: _reference_isa(s, w, dim, tau), [sim, weight], [grad])
        return gs.contiguous(), gw.contiguous()
    x = _rows(sim, dim)
    g = grad.reshape(-1).contiguous()
    if impl == "triton":
        from ..triton.isa import isa_bwd
        gx, gw = isa_bwd(g, x, weight.contiguous(), tau)
    else:
        gx, gw = torch.ops.tvr_C.isa_bwd(g, x, weight, tau)
    moved = list(sim.movedim(dim, -1).shape)
    return gx.reshape(moved).movedim(-1, dim).contiguous(), gw


@_isa_backward.register_fake
def _(grad, sim, weight, dim, tau, backend):
    return (torch.empty_like(sim, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _isa_setup_context(ctx, inputs, output):
    sim, weight, ctx.dim, ctx.tau, ctx.backend = inputs
    ctx.save_for_backward(sim, weight)


def _isa_autograd(ctx, grad):
    sim, weight = ctx.saved_tensors
    gs, gw = torch.ops.tvr.isa_backward(grad, sim, weight, ctx.dim, ctx.tau, ctx.backend)
    return gs, gw, None, None, None


_isa.register_autograd(_isa_autograd, setup_context=_isa_setup_context)
first_order_only(_isa_backward, "isa")


def isa(sim: Tensor, weight: Tensor, dim: int = -1, tau: float = 0.01) -> Tensor:
    """Interactive similarity aggregation (UCoFiA) over axis ``dim``, fused.

    Args:
        sim: ``[..., n, ...]`` similarities, any rank and float dtype; ``n = sim.shape[dim]``.
        weight: ``[n, n]``, same dtype and device as ``sim``.
        dim: the reduced axis (negative counts from the end).
        tau: softmax temperature, finite and > 0.

    Returns:
        ``sim.shape`` without axis ``dim``: ``sum_j w_j sim_j`` where, along ``dim``,
        ``A = softmax(sim / tau)``, ``B_j = sum_i A_i weight[i, j]``, ``w = softmax(B / tau)``.
        Differentiable in ``sim`` and ``weight``.

    Example::

        s = tk.isa(torch.randn(1000, 1000, 12), torch.eye(12), dim=-1)   # [1000, 1000]
    """
    check_isa_args(sim, weight, dim, tau)
    return torch.ops.tvr.isa(sim, weight, dim, float(tau), _backend.requested_backend())


# --------------------------------------------------------------------------------------------
# bi_isa

@torch.library.custom_op("tvr::bi_isa", mutates_args=())
def _bi_isa(words: Tensor, patches: Tensor, word_weight: Tensor, patch_weight: Tensor,
            word_weight2: Tensor, patch_weight2: Tensor, tau: float, backend: str) -> Tensor:
    impl = pick("bi_isa", words, backend, _SUPPORTED)
    args = (words, patches, word_weight, patch_weight, word_weight2, patch_weight2)
    if impl == "reference":
        return _reference_bi_isa(*args, tau)
    if impl == "triton":
        from ..triton.isa import bi_isa_fwd
        return bi_isa_fwd(*args, tau)
    return torch.ops.tvr_C.bi_isa_fwd(*args, tau)


@_bi_isa.register_fake
def _(words, patches, word_weight, patch_weight, word_weight2, patch_weight2, tau, backend):
    return words.new_empty((words.shape[0], patches.shape[0]))


@torch.library.custom_op("tvr::bi_isa_backward", mutates_args=())
def _bi_isa_backward(grad: Tensor, words: Tensor, patches: Tensor, word_weight: Tensor,
                     patch_weight: Tensor, word_weight2: Tensor, patch_weight2: Tensor,
                     tau: float, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = pick("bi_isa", words, backend, _SUPPORTED)
    args = (words, patches, word_weight, patch_weight, word_weight2, patch_weight2)
    if impl == "reference":
        grads = reference_vjp(lambda *a: _reference_bi_isa(*a, tau), list(args), [grad])
        return tuple(g.contiguous() for g in grads)
    if impl == "triton":
        from ..triton.isa import bi_isa_bwd
        return bi_isa_bwd(grad, *args, tau)
    return torch.ops.tvr_C.bi_isa_bwd(grad, *args, tau)


@_bi_isa_backward.register_fake
def _(grad, words, patches, word_weight, patch_weight, word_weight2, patch_weight2, tau, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (words, patches, word_weight, patch_weight, word_weight2, patch_weight2))


def _bi_isa_setup_context(ctx, inputs, output):
    *tensors, ctx.tau, ctx.backend = inputs
    ctx.save_for_backward(*tensors)


def _bi_isa_autograd(ctx, grad):
    grads = torch.ops.tvr.bi_isa_backward(grad, *ctx.saved_tensors, ctx.tau, ctx.backend)
    return (*grads, None, None)


_bi_isa.register_autograd(_bi_isa_autograd, setup_context=_bi_isa_setup_context)
first_order_only(_bi_isa_backward, "bi_isa")


def bi_isa(words: Tensor, patches: Tensor, word_weight: Tensor, patch_weight: Tensor,
           word_weight2: Tensor, patch_weight2: Tensor, tau: float = 0.01) -> Tensor:
    """Bi-directional ISA over the patch-word similarity (UCoFiA), fused.

    ``G[t, l, v, p] = <words[t, l], patches[v, p]>`` is computed tile by tile and never stored
    (neither in forward nor backward), so memory does not grow with ``Bt * Bv``: a 1000 x 1000
    evaluation runs in one call.

    Args:
        words: ``[Bt, L, D]`` text-token features.
        patches: ``[Bv, P, D]`` selected patch features.
        word_weight: ``[L, L]`` (path A, first stage); patch_weight: ``[P, P]`` (path B, first
            stage); word_weight2: ``[L, L]`` (path B, second stage); patch_weight2: ``[P, P]``
            (path A, second stage). All of one dtype and device.
        tau: softmax temperature, finite and > 0.

    Returns:
        ``[Bt, Bv]``: ``(A + B) / 2`` with path A = ISA over words then over patches and path
        B = ISA over patches then over words. Differentiable in all six tensors.

    Example::

        s = tk.bi_isa(words, patches, *[torch.eye(n) for n in (32, 48, 32, 48)])
    """
    check_bi_isa_args(words, patches, word_weight, patch_weight, word_weight2, patch_weight2, tau)
    return torch.ops.tvr.bi_isa(words, patches, word_weight, patch_weight, word_weight2,
                                patch_weight2, float(tau), _backend.requested_backend())
