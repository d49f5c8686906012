"""``tvr::stochastic_max_similarity``: registration, autograd and backend choice (SPEC 5).

Kernels: csrc/cpu/stochastic_max_similarity.cpp (cpp), tvr_kernels/triton/
stochastic_max_similarity.py (triton, forward and backward: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); reference: tvr_kernels/reference/stochastic_max_similarity.py.
``best`` is an integer output and carries no gradient; ``noise`` (when injected) is treated as
a constant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _philox
from ..reference.stochastic_max_similarity import check_stochastic_max_similarity_args
from ..reference.stochastic_max_similarity import selected_similarity as _ref_selected
from ..reference.stochastic_max_similarity import stochastic_max_similarity as _reference
from ..reference.stochastic_max_similarity import stochastic_text_embedding as _ref_embedding
from ._common import first_order_only, pick, reference_vjp

_SUPPORTED = ("reference", "cpp", "triton")


@torch.library.custom_op("tvr::stochastic_max_similarity", mutates_args=())
def _smsim(text: Tensor, frames: Tensor, pooled: Tensor, radius_weight: Tensor, radius_bias: Tensor,
           num_samples: int, prior: str, std: float, seed: int, noise: Optional[Tensor],
           text_offset: int, video_offset: int, backend: str) -> tuple[Tensor, Tensor]:
    impl = pick("stochastic_max_similarity", text, backend, _SUPPORTED)
    if impl == "reference":
        return _reference(text, frames, pooled, radius_weight, radius_bias, num_samples,
                          prior=prior, std=std, seed=seed, noise=noise,
                          pair_offset=(text_offset, video_offset))
    if impl == "triton":
        from ..triton.stochastic_max_similarity import stochastic_max_similarity_fwd
        return stochastic_max_similarity_fwd(text, frames, pooled, radius_weight, radius_bias,
                                             num_samples, prior, std, seed, noise, text_offset,
                                             video_offset)
    return torch.ops.tvr_C.stochastic_max_similarity_fwd(text, frames, pooled, radius_weight,
                                                         radius_bias, num_samples, prior, std,
                                                         seed, noise, text_offset, video_offset)


@_smsim.register_fake
def _(text, frames, pooled, radius_weight, radius_bias, num_samples, prior, std, seed, noise,
      text_offset, video_offset, backend):
    Nt, Nv = text.shape[0], frames.shape[0]
    return text.new_empty(Nt, Nv), text.new_empty(Nt, Nv, dtype=torch.int64)


@torch.library.custom_op("tvr::stochastic_max_similarity_backward", mutates_args=())
def _smsim_backward(grad: Tensor, text: Tensor, frames: Tensor, pooled: Tensor,
                    radius_weight: Tensor, radius_bias: Tensor, best: Tensor, num_samples: int,
                    prior: str, std: float, seed: int, noise: Optional[Tensor], text_offset: int,
                    video_offset: int, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = pick("stochastic_max_similarity", grad, backend, _SUPPORTED)
    if impl == "triton":
        from ..triton.stochastic_max_similarity import stochastic_max_similarity_bwd
        return stochastic_max_similarity_bwd(grad, text, frames, pooled, radius_weight,
                                             radius_bias, best, num_samples, prior, std, seed,
                                             noise, text_offset, video_offset)
    if impl == "reference":
        def fn(t, f, p, w, b):
            return _ref_selected(t, f, p, w, b, best, prior=prior, std=std, seed=seed, noise=noise,
                                 pair_offset=(text_offset, video_offset))
        grads = reference_vjp(fn, [text, frames, pooled, radius_weight, radius_bias], [grad])
        return tuple(g.contiguous() for g in grads)
    return torch.ops.tvr_C.stochastic_max_similarity_bwd(grad, text, frames, pooled, radius_weight,
                                                         radius_bias, best, num_samples, prior,
                                                         std, seed, noise, text_offset,
                                                         video_offset)


@_smsim_backward.register_fake
def _(grad, text, frames, pooled, radius_weight, radius_bias, best, num_samples, prior, std, seed,
      noise, text_offset, video_offset, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format)
                 for x in (text, frames, pooled, radius_weight, radius_bias))


def _setup_context(ctx, inputs, output):
    (text, frames, pooled, w, b, ctx.num_samples, ctx.prior, ctx.std, ctx.seed, noise,
     ctx.text_offset, ctx.video_offset, ctx.backend) = inputs
    ctx.save_for_backward(text, frames, pooled, w, b, output[1], noise)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_sims, grad_best):
    text, frames, pooled, w, b, best, noise = ctx.saved_tensors
    if grad_sims is None:
        grad_sims = torch.zeros(best.shape, dtype=text.dtype, device=text.device)
    grads = torch.ops.tvr.stochastic_max_similarity_backward(
        grad_sims.contiguous(), text, frames, pooled, w, b, best, ctx.num_samples, ctx.prior,
        ctx.std, ctx.seed, noise, ctx.text_offset, ctx.video_offset, ctx.backend)
    return (*grads, None, None, None, None, None, None, None, None)


_smsim.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_smsim_backward, "stochastic_max_similarity")


def stochastic_max_similarity(text: Tensor, frames: Tensor, pooled: Tensor, radius_weight: Tensor,
                              radius_bias: Tensor, num_samples: int = 20, *, prior: str = "uniform",
                              std: float = 1.0, seed: int | None = None,
                              noise: Tensor | None = None,
                              pair_offset: tuple[int, int] = (0, 0)) -> tuple[Tensor, Tensor]:
    """T-MASS inference scoring: best of ``M`` stochastic texts per (text, video) pair, fused.

    Per pair ``(i, j)``: ``S_k = cos(text_i, frames_j,k)``, ``R = exp(radius_weight @ S +
    radius_bias)``, ``t_m = text_i + eps_m * R`` for ``m < M``, ``c_m = cos(t_m, pooled[j, i])``.
    The samples are never materialised: the kernels draw ``eps_m`` from a Philox stream keyed
    by ``(seed, i, j, m, d)``, so the same seed gives the same result on every run, backend
    (up to rounding) and chunking of texts or videos.

    Args:
        text: ``[Nt, D]`` text embeddings (need not be normalised).
        frames: ``[Nv, T, D]`` frame embeddings.
        pooled: ``[Nv, Nt, D]``: video ``j`` pooled for text ``i`` (X-Pool). Only this holds
            ``Nt*Nv*D`` values; score a large gallery in chunks of videos (see
            benchmarks/bench_stochastic_max_similarity.py).
        radius_weight: ``[D, T]``, radius_bias: ``[D]``: the radius module's ``Linear(T, D)``.
        num_samples: ``M >= 1`` (the authors use 20 at evaluation).
        prior: ``"uniform"`` (``U[0, 1)``, the authors' default) or ``"normal"``
            (``N(0, std^2)``).
        std: standard deviation of the normal prior, finite and > 0.
        seed: Philox seed in ``[0, 2**63)``; ``None`` draws one from torch's generator (so
            ``torch.manual_seed`` governs it). Keep it to recompute the selected texts with
            :func:`stochastic_text_embedding`.
        noise: optional ``[Nt, Nv, M, D]`` prior samples used as is (small tests only).
        pair_offset: ``(i0, j0)``, global index of this call's first text and first video. The
            noise of local pair ``(i, j)`` is keyed by ``(i0 + i, j0 + j)``, so scoring a
            gallery chunk by chunk (each chunk with its offsets) gives the entries of one call
            over everything bit for bit, on every backend: each entry is computed from its own
            pair alone (the reference too: it uses no matmul across the batch).

    Returns:
        ``(sims, best)``: ``[Nt, Nv]`` in ``text``'s dtype, and ``[Nt, Nv]`` int64, the first
        sample reaching the max. NaN propagates as in ``torch.max``, on every backend: a pair
        with a NaN sample cosine (a NaN or all-zero row of ``text``, ``frames`` or ``pooled``)
        scores NaN and ``best`` is its first NaN sample. ``sims`` is differentiable (through the selected sample) with
        respect to ``text``, ``frames``, ``pooled``, ``radius_weight`` and ``radius_bias``.

    Example::

        sims, best = tk.stochastic_max_similarity(t, f, p, w, b, 20, seed=0)
    """
    check_stochastic_max_similarity_args(text, frames, pooled, radius_weight, radius_bias,
                                         num_samples, prior, std, seed, noise, pair_offset)
    if noise is not None:
        seed = 0 if seed is None else seed  # unused: the noise is given
    elif seed is None:
        seed = _philox.draw_seed()
    return torch.ops.tvr.stochastic_max_similarity(text, frames, pooled, radius_weight, radius_bias,
                                                   num_samples, prior, float(std), seed, noise,
                                                   pair_offset[0], pair_offset[1],
                                                   _backend.requested_backend())


def stochastic_text_embedding(text: Tensor, frames: Tensor, radius_weight: Tensor,
                              radius_bias: Tensor, best: Tensor, pairs: Tensor | None = None, *,
                              prior: str = "uniform", std: float = 1.0, seed: int | None = None,
                              noise: Tensor | None = None,
                              pair_offset: tuple[int, int] = (0, 0)) -> Tensor:
    """The selected stochastic text ``text_i + eps[i, j, best[i, j]] * R_ij`` of given pairs,
    recomputed from ``seed`` (or ``noise``) and ``best``.

    Args:
        text ``[Nt, D]``, frames ``[Nv, T, D]``, radius_weight ``[D, T]``, radius_bias ``[D]``,
        prior, std, seed, noise, pair_offset: as passed to :func:`stochastic_max_similarity`
            (``seed`` must be given when ``noise`` is not).
        best: ``[Nt, Nv]`` int64, as returned by :func:`stochastic_max_similarity`.
        pairs: ``[P, 2]`` integer rows ``(i, j)``, or None for every pair (``[Nt, Nv, D]``
            output: small inputs only).

    Returns:
        ``[P, D]`` (or ``[Nt, Nv, D]``) in ``text``'s dtype, differentiable; its cosine with
        ``pooled[j, i]`` is ``sims[i, j]`` (up to rounding). Costs ``O(P * D * T)``: plain torch.
    """
    return _ref_embedding(text, frames, radius_weight, radius_bias, best, pairs, prior=prior,
                          std=std, seed=seed, noise=noise, pair_offset=pair_offset)
