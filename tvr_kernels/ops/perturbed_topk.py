"""``tvr::perturbed_topk``: registration, autograd and backend choice (SPEC 2).

Kernels: csrc/cpu/perturbed_topk.cpp (cpp), tvr_kernels/triton/perturbed_topk.py (triton);
reference: tvr_kernels/reference/perturbed_topk.py.

The forward op returns two ``[b, k, d]`` float32 tensors: the indicators and
``W[b, j, i] = sum_s one_hot[b, s, j, i] * g(z[b, s, i])``, the authors'
``einsum("bnkd,bnd->bkd", one_hot, noise)`` before its division by ``S * sigma``. Every
kernel accumulates W while it counts (it has each selected noise value at hand), so autograd
saves W (as small as the output) and the backward op is ``einsum(grad, W / S / sigma)``:
no noise is stored, and none has to be drawn again.

That backward is the authors' estimator, the diagonal of the perturbed-optimiser Jacobian.
``gradient="full"`` contracts the whole Jacobian instead (``tvr::perturbed_topk_full_backward``):
it needs, per sample, the output gradient at that sample's selection and every ``g(z)``, so
autograd saves only the scores (and the injected noise, which the caller holds anyway) and the
backward kernel walks the samples again, redrawing the noise from the Philox key and
re-selecting: nothing of size ``b*S*d``, ``b*S*k`` or ``b*k*d*d`` is stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _philox
from ..reference.perturbed_topk import (_forward_pieces, backward_from_sum,
                                        check_perturbed_topk_args, expected_gradient_sum,
                                        full_gradient, hard_topk, perturbed_topk_noise)
from ._common import first_order_only, pick

_SUPPORTED = ("reference", "cpp", "triton")


def _reference_forward(scores, k, num_samples, sigma, noise, seed, distribution, hard):
    b, d = scores.shape
    if hard:
        ind = hard_topk(scores, k)
        return ind, torch.zeros_like(ind)
    if noise is None:
        noise = perturbed_topk_noise(b, num_samples, d, seed, distribution, scores.device)
    ind, one_hot = _forward_pieces(scores, k, num_samples, sigma, noise, distribution)
    # contiguous: the fake kernel (and the fused kernels) promise contiguous outputs
    return ind.contiguous(), expected_gradient_sum(one_hot, noise, distribution).contiguous()


@torch.library.custom_op("tvr::perturbed_topk", mutates_args=())
def _perturbed_topk(scores: Tensor, k: int, num_samples: int, sigma: float, noise: Optional[Tensor],
                    seed: int, distribution: str, hard: bool, gradient: str,
                    backend: str) -> tuple[Tensor, Tensor]:
    impl = pick("perturbed_topk", scores, backend, _SUPPORTED)
    if impl == "reference":
        return _reference_forward(scores, k, num_samples, sigma, noise, seed, distribution, hard)
    if impl == "triton":
        from ..triton.perturbed_topk import perturbed_topk_fwd
        return perturbed_topk_fwd(scores, k, num_samples, sigma, noise, seed, distribution == "gumbel", hard)
    return torch.ops.tvr_C.perturbed_topk_fwd(scores, k, num_samples, sigma, noise, seed,
                                              distribution == "gumbel", hard)


@_perturbed_topk.register_fake
def _(scores, k, num_samples, sigma, noise, seed, distribution, hard, gradient, backend):
    b, d = scores.shape
    out = scores.new_empty((b, k, d), dtype=torch.float32)
    return out, torch.empty_like(out)


@torch.library.custom_op("tvr::perturbed_topk_backward", mutates_args=())
def _perturbed_topk_backward(grad: Tensor, expected_grad: Tensor, num_samples: int, sigma: float,
                             backend: str) -> Tensor:
    impl = pick("perturbed_topk", expected_grad, backend, _SUPPORTED)
    if impl == "reference":
        return backward_from_sum(grad, expected_grad, num_samples, sigma).contiguous()
    if impl == "triton":
        from ..triton.perturbed_topk import perturbed_topk_bwd
        return perturbed_topk_bwd(grad, expected_grad, num_samples, sigma)
    return torch.ops.tvr_C.perturbed_topk_bwd(grad, expected_grad, num_samples, sigma)


@_perturbed_topk_backward.register_fake
def _(grad, expected_grad, num_samples, sigma, backend):
    b, _, d = expected_grad.shape
    return expected_grad.new_empty((b, d))


def _full_reference(grad, scores, k, num_samples, sigma, noise, seed, distribution):
    if noise is None:
        b, d = scores.shape
        noise = perturbed_topk_noise(b, num_samples, d, seed, distribution, scores.device)
    _, one_hot = _forward_pieces(scores, k, num_samples, sigma, noise, distribution)
    return full_gradient(grad, one_hot, noise, num_samples, sigma, distribution).contiguous()


@torch.library.custom_op("tvr::perturbed_topk_full_backward", mutates_args=())
def _perturbed_topk_full_backward(grad: Tensor, scores: Tensor, k: int, num_samples: int,
                                  sigma: float, noise: Optional[Tensor], seed: int,
                                  distribution: str, backend: str) -> Tensor:
    impl = pick("perturbed_topk", scores, backend, _SUPPORTED)
    if impl == "reference":
        return _full_reference(grad, scores, k, num_samples, sigma, noise, seed, distribution)
    if impl == "triton":
        from ..triton.perturbed_topk import perturbed_topk_full_bwd
        return perturbed_topk_full_bwd(grad, scores, k, num_samples, sigma, noise, seed,
                                       distribution == "gumbel")
    return torch.ops.tvr_C.perturbed_topk_full_bwd(grad, scores, k, num_samples, sigma, noise, seed,
                                                   distribution == "gumbel")


@_perturbed_topk_full_backward.register_fake
def _(grad, scores, k, num_samples, sigma, noise, seed, distribution, backend):
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    scores, k, num_samples, sigma, noise, seed, distribution, hard, gradient, backend = inputs
    ctx.num_samples, ctx.sigma, ctx.hard, ctx.backend = num_samples, sigma, hard, backend
    ctx.scores_dtype, ctx.full = scores.dtype, gradient == "full" and not hard
    ctx.mark_non_differentiable(output[1])
    if ctx.full:
        # The backward re-walks the samples: it needs the scores and the noise (or its key),
        # not W.
        ctx.k, ctx.seed, ctx.distribution = k, seed, distribution
        ctx.has_noise = noise is not None
        ctx.save_for_backward(scores, noise if noise is not None else scores.new_empty(0))
    else:
        ctx.save_for_backward(output[1])


def _backward(ctx, grad, _grad_w):
    if ctx.full:
        scores, noise = ctx.saved_tensors
        gs = torch.ops.tvr.perturbed_topk_full_backward(
            grad, scores, ctx.k, ctx.num_samples, ctx.sigma, noise if ctx.has_noise else None,
            ctx.seed, ctx.distribution, ctx.backend)
        return gs.to(ctx.scores_dtype), None, None, None, None, None, None, None, None, None
    (w,) = ctx.saved_tensors
    if ctx.hard:  # plain top-k is piecewise constant: zero gradient (reference: _HardTopK)
        gs = w.new_zeros((w.shape[0], w.shape[2]))
    else:
        gs = torch.ops.tvr.perturbed_topk_backward(grad, w, ctx.num_samples, ctx.sigma, ctx.backend)
    return gs.to(ctx.scores_dtype), None, None, None, None, None, None, None, None, None


_perturbed_topk.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_perturbed_topk_backward, "perturbed_topk")
first_order_only(_perturbed_topk_full_backward, "perturbed_topk")


def perturbed_topk(scores: Tensor, k: int, num_samples: int = 500, sigma: float = 0.05, *,
                   noise: Optional[Tensor] = None, seed: Optional[int] = None,
                   distribution: str = "normal", hard: bool = False,
                   gradient: str = "diagonal") -> Tensor:
    """Differentiable top-k by random perturbation (TS2-Net's token selection), fused.

    For each of ``num_samples`` samples, the ``k`` largest entries of
    ``scores + sigma * z`` are chosen and their indices sorted ascending; row ``j`` of the
    result counts how often index ``i`` was the ``j``-th smallest chosen one, divided by ``S``.

    Args:
        scores: ``[b, d]``, any float dtype (perturbed in float32, float64 for float64).
        k: ``1 <= k <= d``.
        num_samples: ``S >= 1``.
        sigma: noise scale, finite and > 0.
        noise: optional float32 ``[b, S, d]`` standard noise used as is (bit-compatible with
            the authors' code given their ``torch.normal`` noise); excludes ``seed``.
        seed: key of the in-kernel Philox noise (same seed, same result on every run and, up
            to the rounding of the noise transform, every backend). ``None`` draws one from
            torch's default generator (so ``torch.manual_seed`` governs it; under
            ``torch.compile(fullgraph=True)`` pass a seed).
        distribution: ``"normal"`` or ``"gumbel"`` (standard Gumbel noise; the estimator
            weights by ``1 - exp(-z)`` instead of ``z``).
        hard: deterministic plain top-k (no noise; gradient zero).
        gradient: which estimator of the perturbed optimiser's Jacobian
            ``J[b, j, i, e] = E[onehot(z)[b, j, i] * g(z[b, e])] / sigma`` (Berthet et al.
            2020) the backward contracts with the output gradient:

            * ``"diagonal"`` (default, the authors' ``einsum("bnkd,bnd->bkd")``): only the
              ``e = i`` terms, ``grad_scores[b, i] = sum_j grad[b, j, i] *
              sum_s onehot[b, s, j, i] * g(z[b, s, i]) / (S sigma)``. Biased: it drops every
              cross derivative, and adding a constant to all scores (which leaves the
              output unchanged) does not give a zero directional derivative. Keep it to
              train checkpoints as published.
            * ``"full"``: the whole Jacobian, ``grad_scores[b, e] = sum_s g(z[b, s, e]) *
              c[b, s] / (S sigma)`` with ``c[b, s] = sum_j grad[b, j, idx[b, s, j]]``
              (``idx``: sample ``s``'s chosen indices). Its backward redraws the noise and
              re-selects (about the forward's cost) and stores nothing beyond the scores.

    Returns:
        ``indicators``: float32 ``[b, k, d]``, differentiable by the chosen estimator.
        Exact ties among perturbed scores go to the smaller index in the fused kernels
        (``torch.topk`` leaves them unspecified); NaN scores are not supported.

    Example::

        ind = tk.perturbed_topk(torch.randn(192, 49), k=3, seed=0)   # [192, 3, 49]
        selected = torch.einsum("bkl,bld->bkd", ind, patch_tokens)
    """
    check_perturbed_topk_args(scores, k, num_samples, sigma, noise, seed, distribution, hard,
                              gradient)
    if noise is None and not hard and seed is None:
        seed = _philox.draw_seed()
    ind, _ = torch.ops.tvr.perturbed_topk(scores, k, num_samples, float(sigma), noise,
                                          0 if seed is None else seed, distribution, hard,
                                          gradient, _backend.requested_backend())
    return ind
