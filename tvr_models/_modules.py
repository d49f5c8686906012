"""Building blocks shared by TS2-Net and UCoFiA: the temporal transformer, the token-score
MLPs, the perturbed top-K token selection, and the contrastive loss.

Module and parameter names follow the authors' (``transformerClip.resblocks.{i}.attn``,
``visual_token_selector.score_predictor.in_conv.0``, ...) so that released checkpoints map
onto them one to one (see :mod:`tvr_models.checkpoints`).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops

LOGIT_SCALE_MAX = math.log(100.0)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


# The authors' temporal transformer (CLIP4Clip's cross module) builds its LayerNorms with
# eps = 1e-12, not PyTorch's 1e-5: with 1e-5 the output drifts from theirs as features shrink
# (2e-3 relative at feature std 0.05).
TEMPORAL_LN_EPS = 1e-12


class TemporalBlock(nn.Module):
    """CLIP-style pre-LN residual block (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc/c_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width, eps=TEMPORAL_LN_EPS)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width, eps=TEMPORAL_LN_EPS)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_bias)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """``layers`` blocks over [B, S, W] with a key mask [B, S] (1 = valid).

    Masked keys get ``-1e6`` added to their logits, as the authors' extended mask."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.heads = heads
        self.resblocks = nn.ModuleList([TemporalBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, s, _ = x.shape
        bias = (1.0 - mask.to(x.dtype))[:, None, :] * -1e6                 # [B, 1, S]
        bias = bias.expand(b, s, s).repeat_interleave(self.heads, dim=0)   # [B*heads, S, S]
        for blk in self.resblocks:
            x = blk(x, bias)
        return x


class ScorePredictor(nn.Module):
    """TS2-Net's token-score MLP on [B*T, N, D] -> [B*T, N] in (-1, 1).

    ``LN(D) -> Linear(D, D/2) -> GELU``; each token's output concatenated with its frame CLS's
    output; ``-> Linear(D, D/2) -> GELU -> Linear(D/2, 1) -> Tanh`` (no biases)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 2, bias=False), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(2 * (dim // 2), dim // 2, bias=False), nn.GELU(),
                                      nn.Linear(dim // 2, 1, bias=False), nn.Tanh())

    def forward(self, x: Tensor, num_frames: int, frame_mask: Tensor | None = None) -> Tensor:
        h = self.in_conv(x)
        h = torch.cat([h, h[:, :1].expand_as(h)], dim=-1)
        return self.out_conv(h).squeeze(-1)


class UCoFiAScorePredictor(nn.Module):
    """UCoFiA's released score MLP on [B*T, N, D] -> [B*T, N].

    Input: each token concatenated with its frame's CLS token (2D); ``LN(2D) -> Linear(2D, D)
    -> GELU`` gives ``h``; each token of ``h`` concatenated with the sum over the video's frames
    of ``h``'s CLS; ``-> Linear(2D, D) -> GELU -> Linear(D, 1) -> Tanh`` (no biases).
    Difference from the authors: the sum runs over *valid* frames only (``frame_mask``); the
    authors also add the padded slots. Identical for full-length videos."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim, bias=False), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(2 * dim, dim, bias=False), nn.GELU(),
                                      nn.Linear(dim, 1, bias=False), nn.Tanh())

    def forward(self, x: Tensor, num_frames: int, frame_mask: Tensor | None = None) -> Tensor:
        bt, n, d = x.shape
        h = self.in_conv(torch.cat([x, x[:, :1].expand_as(x)], dim=-1))            # [BT, N, D]
        cls = h[:, 0].reshape(bt // num_frames, num_frames, -1)                     # [B, T, D]
        if frame_mask is not None:
            cls = cls * frame_mask[..., None].to(cls.dtype)
        vid = cls.sum(1, keepdim=True).expand(-1, num_frames, -1).reshape(bt, 1, -1)
        return self.out_conv(torch.cat([h, vid.expand_as(h)], dim=-1)).squeeze(-1)


class VisualTokenSelection(nn.Module):
    """Keep each frame's CLS and ``topk`` patch tokens chosen by ``tk.perturbed_topk``.

    Input [B*T, N, D] (video-major); output [B, T*(topk+1), D], per frame ``[CLS, sel_1..k]``
    with ``sel = einsum("bkl,bld->bkd", indicators, patches)`` (soft mixtures of patches with
    ``num_samples`` perturbations, as the authors, also at evaluation).

    ``hard=True`` uses the deterministic hard top-k; ``seed`` fixes the perturbation noise
    (``None``: drawn from torch's generator, so ``torch.manual_seed`` governs it);
    ``topk_gradient`` is the estimator the score predictor trains with (``"diagonal"``, the
    authors'; ``"full"``, the whole perturbed-optimiser Jacobian: see ``tk.perturbed_topk``)."""

    def __init__(self, score_predictor: nn.Module, topk: int = 3, num_samples: int = 500,
                 sigma: float = 0.05, topk_gradient: str = "diagonal"):
        super().__init__()
        from tvr_kernels.reference.perturbed_topk import GRADIENTS
        if topk_gradient not in GRADIENTS:
            raise ValueError(f"topk_gradient must be one of {GRADIENTS}, got {topk_gradient!r}")
        self.score_predictor = score_predictor
        self.topk, self.num_samples, self.sigma = topk, num_samples, sigma
        self.topk_gradient = topk_gradient
        self.hard = False
        self.seed: int | None = None

    def forward(self, x: Tensor, num_frames: int, frame_mask: Tensor | None = None) -> Tensor:
        bt, n, d = x.shape
        scores = self.score_predictor(x, num_frames, frame_mask)[:, 1:]             # [BT, N-1]
        ind = _ops.perturbed_topk(scores, self.topk, self.num_samples, self.sigma,
                                  seed=self.seed, hard=self.hard,
                                  gradient=self.topk_gradient)                      # [BT, k, N-1]
        selected = torch.einsum("bkl,bld->bkd", ind.to(x.dtype), x[:, 1:])
        out = torch.cat([x[:, :1], selected], dim=1)                                # [BT, k+1, D]
        return out.reshape(bt // num_frames, num_frames * (self.topk + 1), d)


def symmetric_cross_entropy(logits: Tensor) -> Tensor:
    """Mean of the text->video and video->text cross-entropies of square [B, B] logits
    (matching pairs on the diagonal)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def scale(logit_scale: Tensor) -> Tensor:
    """``exp(logit_scale)`` with ``logit_scale`` clamped at ln 100 (CLIP's cap)."""
    return logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, T, D] over valid T (mask [B, T]); an all-masked row gives 0."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def slice_features(feats: dict, s: slice) -> dict:
    """Rows ``s`` of every tensor in a feature dict (all share dim 0)."""
    return {k: v[s] for k, v in feats.items()}


class RetrievalModel(nn.Module):
    """Common interface of the models.

    * ``encode_text(input_ids [Bt, L], attention_mask [Bt, L]) -> dict`` of [Bt, ...] tensors;
    * ``encode_video(video [Bv, T, 3, H, W], video_mask [Bv, T]) -> dict`` of [Bv, ...] tensors;
    * ``score(text_feats, video_feats) -> [G, Bt, Bv]``: the G granularities' logits of a chunk;
      ``score_chunk(..., offset)`` is what the evaluation calls (``offset``: the chunk's place);
    * ``prepare_scoring(text_feats, video_feats, text_to_video)`` runs once before scoring;
    * ``finalize(sims [G, Nt, Nv], bank_sims [G, Nb, Nv] | None) -> [Nt, Nv]``;
    * ``loss(text_feats, video_feats)`` -> training loss of a batch of matching pairs
      (default: symmetric cross-entropy of ``training_logits``);
    * ``forward(...)`` -> ``loss`` of the encoded batch, gathered over the ranks when
      ``torch.distributed`` is initialised (see :mod:`tvr_models.distributed`).

    ``gather_across_ranks`` (default True): under ``torch.distributed`` the loss compares every
    text with every video of the global batch, as the authors train; False keeps each rank's
    loss to its own batch.
    """

    gather_across_ranks = True

    granularities = 1

    def training_logits(self, text_feats: dict, video_feats: dict) -> Tensor:
        return self.score(text_feats, video_feats).mean(0)

    def finalize(self, sims: Tensor, bank_sims: Tensor | None = None) -> Tensor:
        return sims.mean(0)

    def score_chunk(self, text_feats: dict, video_feats: dict, offset: tuple[int, int]) -> Tensor:
        """``score`` of one evaluation block whose first text and video are text ``offset[0]``
        and video ``offset[1]`` of the whole evaluation. A model that draws noise per pair
        (T-MASS) keys it by these global indices, so its scores do not depend on the block
        size; the others ignore them."""
        return self.score(text_feats, video_feats)

    def prepare_scoring(self, text_feats: dict, video_feats: dict, text_to_video=None) -> tuple[dict, dict]:
        """Features as the scoring stage takes them; ``text_to_video`` [Nt] is the evaluation's
        ground truth (None: text i describes video i). Unchanged by default: only T-MASS's
        ``legacy_leaky_scoring`` (the authors' evaluation, which leaks it) reads it."""
        return text_feats, video_feats

    def loss(self, text_feats: dict, video_feats: dict) -> Tensor:
        """Training loss of features of matching pairs (text i describes video i)."""
        return symmetric_cross_entropy(self.training_logits(text_feats, video_feats))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, video: Tensor, video_mask: Tensor,
                loss_seed: int | None = None) -> Tensor:
        """Training loss of a batch of matching pairs (text i describes video i).

        Under ``torch.distributed`` (and ``gather_across_ranks``) the features of every rank's
        pairs are gathered with gradients first, so the loss is that of the global batch
        (:func:`tvr_models.distributed.gather_pairs`). ``loss_seed``: the loss runs under
        torch's generators seeded with it (:func:`tvr_models.distributed.shared_rng`; the
        same on every rank, so every rank draws the loss's noise alike); None: unchanged."""
        from . import distributed
        feats = self.encode_text(input_ids, attention_mask), self.encode_video(video, video_mask)
        if self.gather_across_ranks:
            feats = distributed.gather_pairs(*feats)
        with distributed.shared_rng(loss_seed, input_ids.device):
            return self.loss(*feats)

    def set_selection(self, *, hard: bool | None = None, seed: int | None = None) -> None:
        """Token selection mode: ``hard`` top-k (deterministic) or perturbed with ``seed``."""
        sel = self.visual_token_selector
        if hard is not None:
            sel.hard = hard
        sel.seed = seed

    @torch.no_grad()
    def similarity(self, text_feats: dict, video_feats: dict, bank_feats: dict | None = None,
                   chunk_size: int = 128, progress: bool = False, text_to_video=None) -> Tensor:
        """Evaluation similarity [Nt, Nv], scored in ``chunk_size`` blocks (bounded memory)."""
        from .evaluate import score_features
        return score_features(self, text_feats, video_feats, bank_feats, chunk_size, progress,
                              text_to_video=text_to_video)
