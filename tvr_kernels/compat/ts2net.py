"""TS2-Net / UCoFiA modules under the authors' names, on the fused ops.

Both papers' repositories define the same two modules (UCoFiA adapted TS2-Net's): the
perturbed top-k of the token selection and the token-shift wrapper of the visual attention
of layers 10-11. The classes below take the same constructor arguments, are called the same
way and hold the same state (none, and ``.net``), so a checkpoint saved with either class
loads into the other; :func:`tvr_kernels.compat.patch` swaps them into a built model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops.perturbed_topk import perturbed_topk
from ..ops.token_shift import token_shift
from ..reference.perturbed_topk import GRADIENTS

# Where PerturbedTopK's noise comes from when none is passed (see its docstring).
RNGS = ("philox", "torch")


class PerturbedTopK(nn.Module):
    """Differentiable top-k of TS2-Net / UCoFiA on the fused ``tk.perturbed_topk``.

    Replaces ``PerturbedTopK`` (module) and ``PerturbedTopKFuntion`` (its autograd function)
    of ``modules/differential_topk.py`` in TS2-Net (``yuqi657/ts2_net``) and UCoFiA
    (``train/modules/differential_topk.py``). Same constructor, same call
    ``module(x)`` with scores ``x`` ``[b, d]`` returning the indicators ``[b, k, d]``
    (float32): for each of ``num_samples`` draws of ``x + sigma * z``, ``z ~ N(0, 1)``, the
    one-hot of the ``k`` largest entries with their indices sorted ascending, averaged. The
    backward is the authors' estimator (``gradient="diagonal"``, the default).

    Noise (``rng``). The authors draw ``torch.normal(0, 1, (b, num_samples, d))`` on the CPU
    from torch's default generator at every call, copy it to the device and keep it, and a
    float32 one-hot ``[b, S, k, d]``, for the backward (56 MB at b = 192).

    * ``"philox"`` (default): the noise is drawn inside the kernel from a counter-based Philox
      stream whose seed is one draw per call from torch's default CPU generator (the one the
      authors draw from, whatever the device). Nothing of size ``b*S*d`` is drawn, copied or
      stored. ``torch.manual_seed`` makes a run reproducible exactly as with the authors'
      class (every call consumes the generator, so calls and epochs get fresh noise), but
      the noise values are not the authors' values: a run is not bit-identical to the same
      seed under the authors' class, only equal in distribution. That is what training wants
      (same estimator, same reproducibility, less time and memory), hence the default.
    * ``"torch"``: the authors' draw, to the bit: the same ``torch.normal`` call on the same
      generator, so under the same ``torch.manual_seed`` the indicators equal the authors'
      exactly (gradients up to summation order) and every later random number (dropout, ...)
      is the one the authors' run gets. Use it to reproduce a published run or to compare
      against the authors' class. The kernels still save nothing of size ``b*S*k*d`` (the
      backward keeps ``[b, k, d]``).

    Differences from the authors': scores in float16/bfloat16 are perturbed in float32 (the
    authors perturb in the scores' dtype); bad arguments raise ``ValueError``/``TypeError``
    naming them; ``forward`` also accepts ``noise`` (a float32 ``[b, S, d]`` standard-normal
    tensor used as is, e.g. to inject the authors' noise in tests) and ``seed`` (a Philox
    seed); the authors' class overrides ``__call__``, this one ``forward`` (hooks run).

    Args:
        k: entries selected, ``1 <= k <= d``.
        num_samples: ``S``, perturbations averaged (500, as the authors).
        sigma: noise scale, finite and > 0 (0.05, as the authors).
        rng: ``"philox"`` or ``"torch"`` (above).
        gradient: ``"diagonal"`` (the authors' estimator) or ``"full"`` (the whole
            perturbed-optimiser Jacobian; see ``tk.perturbed_topk``).
    """

    def __init__(self, k: int, num_samples: int = 500, sigma: float = 0.05, *,
                 rng: str = "philox", gradient: str = "diagonal"):
        super().__init__()
        _validate.integer("k", k, min_value=1)
        _validate.integer("num_samples", num_samples, min_value=1)
        _validate.positive_finite("sigma", sigma)
        _validate.choice("rng", rng, RNGS)
        _validate.choice("gradient", gradient, GRADIENTS)
        self.k, self.num_samples, self.sigma = k, num_samples, sigma
        self.rng, self.gradient = rng, gradient

    def forward(self, x: Tensor, *, noise: Tensor | None = None,
                seed: int | None = None) -> Tensor:
        """``x`` ``[b, d]`` -> indicators ``[b, k, d]`` float32 (``noise``, ``seed``: above)."""
        _validate.tensor("x", x, ndim=2, shape_doc="[b, d] (scores)")
        if noise is None and seed is None and self.rng == "torch":
            b, d = x.shape
            noise = torch.normal(mean=0.0, std=1.0, size=(b, self.num_samples, d)).to(x.device)
        return perturbed_topk(x, self.k, self.num_samples, self.sigma, noise=noise, seed=seed,
                              gradient=self.gradient)

    def extra_repr(self) -> str:
        return (f"k={self.k}, num_samples={self.num_samples}, sigma={self.sigma}, "
                f"rng={self.rng!r}, gradient={self.gradient!r}")


class PatchShiftModule(nn.Module):
    """TS2-Net's token shift in front of a visual attention, on the fused ``tk.token_shift``.

    Replaces ``PatchShiftModule`` of ``modules/until_module.py`` in TS2-Net and UCoFiA
    (installed by their ``make_patch_shift`` around the ``attn`` of visual blocks 10 and
    11). Same constructor, same call
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None)``
    with ``query`` ``[L, N, D]`` sequence-first (``L`` tokens, CLS first; ``N = B *
    video_frame`` frames, video-major), same state: the wrapped attention stays at ``.net``,
    so state-dict keys (``...resblocks.10.attn.net.in_proj_weight``, ...) are unchanged.

    What moves (the authors' code, SPEC 1): whole tokens (all ``D`` channels), with
    ``fold = L // n_div``: tokens ``1, 1 + fold, ...`` of frame ``t >= 1`` take frame
    ``t - 1``'s, tokens ``1 + offset, 1 + offset + fold, ...`` (``offset = 3``, a constant
    in the authors' code) of frame ``t <= T - 2`` take frame ``t + 1``'s, the latter winning
    where both hold a token. CLS never moves, the end frames keep their own tokens. So
    ``n_div`` is a token-stride divisor (``fold_div`` of ``tk.token_shift``), not a channel
    fraction as in TSM. The shifted ``query`` is passed to ``net`` as query, key and value;
    ``key`` and ``value`` are ignored (self-attention, as the authors).

    Differences from the authors': a ``key_padding_mask`` is passed on to ``net`` (the
    authors drop it; CLIP never passes one, so the results agree); bad shapes raise
    ``ValueError`` naming ``query`` (theirs fail inside a reshape or ``arange``).

    Args:
        net: the wrapped attention (``nn.MultiheadAttention`` in CLIP), called as
            ``net(x, x, x, need_weights=..., attn_mask=...)``.
        video_frame: frames per video ``T``.
        n_div: ``fold = L // n_div`` (7 in both papers).
        offset: first forward-looking token minus 1 (3 in the authors' code).
    """

    def __init__(self, net: nn.Module, video_frame: int, n_div: int, *, offset: int = 3):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module (the wrapped attention), got "
                            f"{type(net).__name__}")
        _validate.integer("video_frame", video_frame, min_value=1)
        _validate.integer("n_div", n_div, min_value=1)
        _validate.integer("offset", offset, min_value=0)
        self.net = net
        self.video_frame, self.n_div, self.offset = video_frame, n_div, offset

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None):
        """Shift ``query`` ``[L, N, D]`` in time, then return ``net``'s output (for
        ``nn.MultiheadAttention``: ``(out [L, N, D], weights or None)``)."""
        _validate.tensor("query", query, ndim=3,
                         shape_doc="[L, N, D] (sequence-first, N = videos * video_frame)")
        L, N, _ = query.shape
        if N % self.video_frame:
            raise ValueError(f"query is [L, N, D] = {tuple(query.shape)}: N = {N} frames must be "
                             f"a multiple of video_frame = {self.video_frame}")
        if L < self.n_div:
            raise ValueError(f"query is [L, N, D] = {tuple(query.shape)}: fold = L // n_div must "
                             f"be >= 1, got L = {L} tokens and n_div = {self.n_div}")
        # token_shift takes frames first ([N, L, D]); the transposes are views.
        x = token_shift(query.transpose(0, 1), self.video_frame, self.n_div,
                        self.offset).transpose(0, 1)
        kwargs = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
        return self.net(x, x, x, need_weights=need_weights, attn_mask=attn_mask, **kwargs)

    def extra_repr(self) -> str:
        return f"video_frame={self.video_frame}, n_div={self.n_div}, offset={self.offset}"
