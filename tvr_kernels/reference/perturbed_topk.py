"""Perturbed top-K of TS2-Net (SPEC 2), written as the authors' ``PerturbedTopKFunction``.

The authors draw ``noise = torch.normal(0, 1, (b, S, d))``, take ``topk`` of
``x[:, None, :] + noise * sigma``, sort the chosen indices ascending, one-hot them into
``[b, S, k, d]`` and average over the samples. Their backward contracts the output gradient
with ``einsum("bnkd,bnd->bkd", one_hot, noise) / S / sigma``: only the diagonal ``e = i`` of
the perturbed-optimiser Jacobian of Berthet et al. (2020),
``J[b, j, i, e] = E[onehot(z)[j, i] * g(z[e])] / sigma``, every cross derivative dropped. It
is the default (``gradient="diagonal"``) so that checkpoints train as published. This module does
exactly that, plus:

* ``gradient="full"``: the whole Jacobian contracted with the output gradient,
  ``grad_scores[b, e] = sum_s g(z[b, s, e]) * c[b, s] / (S sigma)`` with
  ``c[b, s] = sum_j grad[b, j, idx[b, s, j]]`` (:func:`full_gradient`); adding a constant to
  every score leaves the output unchanged, and only this estimator's rows reflect that;

* ``noise=``: the noise tensor used as is (bit-compatible with the authors given their noise);
* ``seed=``: the noise the fused kernels draw in-kernel (:func:`perturbed_topk_noise`, the
  Philox keying of csrc/include/tvr/perturbed_topk.h), so seeded results agree across backends;
* ``distribution="gumbel"``: standard Gumbel noise and ``g(z) = 1 - exp(-z)`` in place of
  ``g(z) = z`` in the estimator;
* ``hard=True``: deterministic plain top-k (no noise) with zero gradient.
"""
from __future__ import annotations

import torch

from .. import _philox, _validate

DISTRIBUTIONS = ("normal", "gumbel")
GRADIENTS = ("diagonal", "full")

# Fourth Philox counter word of this op ("TOPK"): separates its stream from other ops' streams
# under the same seed. Must equal TVR_PTOPK_STREAM in csrc/include/tvr/perturbed_topk.h.
STREAM = 0x544F504B
_INV_2_23 = 1.0 / (1 << 23)


def check_perturbed_topk_args(scores, k, num_samples, sigma, noise=None, seed=None,
                              distribution="normal", hard=False, gradient="diagonal") -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument (shapes only, no data read)."""
    _validate.tensor("scores", scores, ndim=2, shape_doc="[b, d]")
    b, d = scores.shape
    _validate.integer("k", k, min_value=1)
    if k > d:
        raise ValueError(f"k must be <= d = scores.shape[1] = {d} (scores is [b, d] = "
                         f"{tuple(scores.shape)}), got k = {k}")
    _validate.integer("num_samples", num_samples, min_value=1)
    _validate.positive_finite("sigma", sigma)
    _validate.choice("distribution", distribution, DISTRIBUTIONS)
    _validate.choice("gradient", gradient, GRADIENTS)
    _validate.seed("seed", seed)
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    if noise is not None:
        if hard:
            raise ValueError("noise must be None when hard=True (hard top-k draws no noise)")
        if seed is not None:
            raise ValueError("give noise or seed, not both (seed only keys in-kernel noise)")
        want = f"[b, num_samples, d] = [{b}, {num_samples}, {d}]"
        _validate.tensor("noise", noise, ndim=3, shape_doc=want, dtypes=(torch.float32,))
        if tuple(noise.shape) != (b, num_samples, d):
            raise ValueError(f"noise must have shape {want}, got {tuple(noise.shape)}")
        _validate.same_device(scores=scores, noise=noise)


def unit_float_open01(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 strictly inside (0, 1): ``((x >> 9) + 0.5) * 2**-23``.

    23 bits plus one half need 24 significant bits, so every backend represents the value
    exactly; the range is ``[2**-24, 1 - 2**-24]``, so ``-log(-log(u))`` is finite."""
    return ((x >> 9).to(torch.float32) + 0.5) * _INV_2_23


def perturbed_topk_noise(b: int, num_samples: int, d: int, seed: int,
                         distribution: str = "normal", device=None) -> torch.Tensor:
    """The ``[b, num_samples, d]`` float32 noise the fused kernels draw for ``seed``.

    Element ``(row, s, i)`` comes from the Philox call with counter
    ``(i // 4, s, row, STREAM)``; lane ``i % 4`` of its four outputs. Normal: Box-Muller on
    outputs (0, 1) gives lanes 0 (cos) and 1 (sin), on (2, 3) lanes 2 and 3. Gumbel:
    ``-log(-log(u))`` with ``u = unit_float_open01(output[i % 4])``. Memory ``O(b*S*d)``:
    for references and tests only.
    """
    q = torch.arange((d + 3) // 4, dtype=torch.int64, device=device)
    s = torch.arange(num_samples, dtype=torch.int64, device=device)
    r = torch.arange(b, dtype=torch.int64, device=device)
    r0, r1, r2, r3 = _philox.philox4x32_10(q[None, None, :], s[None, :, None], r[:, None, None],
                                           STREAM, seed)
    if distribution == "normal":
        z0, z1 = _philox.box_muller(r0, r1)
        z2, z3 = _philox.box_muller(r2, r3)
        lanes = [z0, z1, z2, z3]
    else:
        lanes = [-torch.log(-torch.log(unit_float_open01(x))) for x in (r0, r1, r2, r3)]
    z = torch.stack(lanes, dim=-1).flatten(-2)  # [b, S, Q, 4] -> index 4q+lane (any b, S)
    return z[:, :, :d].contiguous()


def noise_gradient(noise: torch.Tensor, distribution: str) -> torch.Tensor:
    """``g(z)``: the negative log-density gradient of the noise (``z`` for normal,
    ``1 - exp(-z)`` for standard Gumbel)."""
    return noise if distribution == "normal" else 1.0 - torch.exp(-noise)


def hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, d]`` -> ``[b, k, d]`` float32 one-hot of the k largest scores, indices ascending.

    A stable descending sort breaks exact ties by the smaller index, the rule every fused
    kernel uses, so hard mode is deterministic and identical on every backend."""
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    idx = torch.sort(idx, dim=-1).values
    return torch.nn.functional.one_hot(idx, scores.shape[1]).float()


def _forward_pieces(scores, k, num_samples, sigma, noise, distribution):
    """The authors' forward on given noise: indicators ``[b, k, d]`` and the one-hot
    ``[b, S, k, d]`` their backward needs."""
    d = scores.shape[1]
    perturbed = scores[:, None, :] + noise * sigma                      # [b, S, d]
    indices = torch.topk(perturbed, k=k, dim=-1, sorted=False).indices  # [b, S, k]
    indices = torch.sort(indices, dim=-1).values
    one_hot = torch.nn.functional.one_hot(indices, num_classes=d).float()  # [b, S, k, d]
    return one_hot.mean(dim=1), one_hot


def expected_gradient_sum(one_hot: torch.Tensor, noise: torch.Tensor, distribution: str) -> torch.Tensor:
    """``W[b, j, i] = sum_s one_hot[b, s, j, i] * g(noise[b, s, i])``: ``[b, k, d]`` float32."""
    return torch.einsum("bnkd,bnd->bkd", one_hot, noise_gradient(noise, distribution))


def backward_from_sum(grad: torch.Tensor, w: torch.Tensor, num_samples: int, sigma: float) -> torch.Tensor:
    """The authors' last two backward steps: ``einsum(grad, W / S / sigma)`` -> ``[b, d]``."""
    return torch.einsum("bkd,bkd->bd", grad.float(), w / num_samples / sigma)


def full_gradient(grad: torch.Tensor, one_hot: torch.Tensor, noise: torch.Tensor,
                  num_samples: int, sigma: float, distribution: str) -> torch.Tensor:
    """The full perturbed-optimiser estimator contracted with ``grad`` ``[b, k, d]``:
    ``grad_scores[b, e] = sum_s g(noise[b, s, e]) * c[b, s] / S / sigma``, where
    ``c[b, s] = sum_{j, i} grad[b, j, i] * one_hot[b, s, j, i]`` is the output gradient at
    sample ``s``'s selection. ``one_hot`` ``[b, S, k, d]``, ``noise`` ``[b, S, d]`` ->
    float32 ``[b, d]``; nothing of size ``b*k*d*d`` is formed."""
    c = torch.einsum("bkd,bnkd->bn", grad.float(), one_hot)
    return torch.einsum("bn,bnd->bd", c, noise_gradient(noise, distribution)) / num_samples / sigma


def full_jacobian(one_hot: torch.Tensor, noise: torch.Tensor, num_samples: int, sigma: float,
                  distribution: str) -> torch.Tensor:
    """The whole estimated Jacobian ``J[b, j, i, e] = sum_s one_hot[b, s, j, i] *
    g(noise[b, s, e]) / S / sigma`` (Berthet et al. 2020, ``"bnkd,bne->bkde"``): float32
    ``[b, k, d, d]``. Eager and ``O(b*k*d*d)``: for tests of :func:`full_gradient` only."""
    return torch.einsum("bnkd,bne->bkde", one_hot, noise_gradient(noise, distribution)) / num_samples / sigma


class _PerturbedTopK(torch.autograd.Function):
    """The authors' autograd function, with the noise passed in (drawn by the caller)."""

    @staticmethod
    def forward(ctx, scores, k, num_samples, sigma, noise, distribution, gradient):
        indicators, one_hot = _forward_pieces(scores, k, num_samples, sigma, noise, distribution)
        ctx.save_for_backward(one_hot, noise)
        ctx.num_samples, ctx.sigma, ctx.distribution = num_samples, sigma, distribution
        ctx.gradient, ctx.scores_dtype = gradient, scores.dtype
        return indicators

    @staticmethod
    def backward(ctx, grad):
        one_hot, noise = ctx.saved_tensors
        if ctx.gradient == "full":
            gs = full_gradient(grad, one_hot, noise, ctx.num_samples, ctx.sigma, ctx.distribution)
        else:
            w = expected_gradient_sum(one_hot, noise, ctx.distribution)
            gs = backward_from_sum(grad, w, ctx.num_samples, ctx.sigma)
        return gs.to(ctx.scores_dtype), None, None, None, None, None, None


class _HardTopK(torch.autograd.Function):
    """Plain top-k: piecewise constant in the scores, so its gradient is zero (not None, so
    graphs that mix it with other terms still backpropagate)."""

    @staticmethod
    def forward(ctx, scores, k):
        ctx.shape, ctx.dtype = scores.shape, scores.dtype
        return hard_topk(scores, k)

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape, dtype=ctx.dtype), None


def perturbed_topk(scores: torch.Tensor, k: int, num_samples: int = 500, sigma: float = 0.05, *,
                   noise: torch.Tensor | None = None, seed: int | None = None,
                   distribution: str = "normal", hard: bool = False,
                   gradient: str = "diagonal") -> torch.Tensor:
    """Differentiable top-k by random perturbation (Berthet et al. 2020), as in TS2-Net.

    Args:
        scores: ``[b, d]``, any float dtype.
        k: number of selected entries, ``1 <= k <= d``.
        num_samples: ``S``, perturbations averaged.
        sigma: noise scale, finite and > 0.
        noise: optional float32 ``[b, S, d]`` standard noise used as is (the authors draw
            ``torch.normal(0, 1, (b, S, d))``). Excludes ``seed``.
        seed: key of the in-kernel Philox noise (:func:`perturbed_topk_noise`); ``None``
            draws one from torch's default generator. Ignored when ``noise`` is given.
        distribution: ``"normal"`` (the authors') or ``"gumbel"`` (standard Gumbel noise).
        hard: deterministic plain top-k instead (no noise, zero gradient).
        gradient: ``"diagonal"`` (the authors' backward: only the ``e = i`` terms of the
            perturbed-optimiser Jacobian) or ``"full"`` (the whole Jacobian,
            :func:`full_gradient`).

    Returns:
        ``indicators``: float32 ``[b, k, d]``; row ``j`` of sample ``s`` is the one-hot of the
        ``j``-th smallest chosen index; averaged over samples, so entries are ``count / S``.
    """
    check_perturbed_topk_args(scores, k, num_samples, sigma, noise, seed, distribution, hard,
                              gradient)
    if hard:
        return _HardTopK.apply(scores, k)
    if noise is None:
        if seed is None:
            seed = _philox.draw_seed()
        b, d = scores.shape
        noise = perturbed_topk_noise(b, num_samples, d, seed, distribution, scores.device)
    return _PerturbedTopK.apply(scores, k, num_samples, sigma, noise, distribution, gradient)
