"""T-MASS (Wang et al., CVPR 2024) on the CLIP backbone (SPEC "Models", op 5).

T-MASS is X-Pool (text-conditioned frame pooling) with a *stochastic* text embedding: a text
is a "mass" around its CLIP feature whose radius depends on the text-video pair.

Pipeline:

1. CLIP towers (no token shift): the text's EOT feature ``t`` [Bt, D]; each frame's CLS
   feature ``f`` [Bv, T, D]. A short video's padded slots take its last valid frame's feature,
   as the authors' loader repeats the last decoded frame.
2. X-Pool pooling (``pool_frames``): a LayerNorm shared by text and frames; one attention
   head, query from the text, keys/values from the frames, softmax over the T frames (scaled
   by ``1/sqrt(D)``); out-projection; LayerNorm; ``h + dropout(linear(h))``; LayerNorm. Every
   linear starts at the identity. ``pooled[j, i]`` is video ``j`` pooled for text ``i``:
   ``[Nv, Nt, D]``.
3. Radius (``stochastic.std_branch``): ``R = exp(Linear(T -> D)(S))`` with ``S`` the T cosines
   of the text with the video's frames (starts at the identity: ``eye_`` on the [D, T] weight).
4. Training: one stochastic text per caption, ``t + eps * R`` with ``R`` from the caption and
   *its own* video, ``eps ~ U[0, 1)^D`` (``prior="uniform"``, the authors' default) or
   ``N(0, std^2)^D`` (``prior="normal"``); logits ``exp(ls) * cos(t_i + eps_i R_i,
   pooled[j, i])``; the support text ``t_i + unit(v_i - t_i) * R_i`` (``v_i``: video ``i``'s
   pooling averaged over the batch's texts, as the authors) gives a second such loss weighted
   by ``alpha``. Both are the symmetric cross-entropy; ``logit_scale`` clamped at ln 100.
5. Evaluation: every (text, video) pair is scored by ``tk.stochastic_max_similarity``: the
   best cosine, over ``num_samples`` stochastic texts, with the video's pooling conditioned
   on the *query* text. The pooling [Nv, Nt, D] is computed one block of texts x videos at a
   time (never for a whole gallery at once), in tiles laid on the global pair grid from
   projections made once per text and per video, and each block calls the op with
   ``pair_offset`` = the block's global position and the model's ``seed``: every pair draws
   the same noise and goes through calls of the same shapes whatever the block size, so the
   scores are bitwise independent of the chunking.

**The authors' evaluation leaks the ground truth** (SPEC 5; T-MASS GitHub issue #7). Their
final similarity of query ``q`` and video ``i`` is ``cos(t*_qi, pooled[i, c])`` with ``c`` the
caption of video ``i`` in ``q``'s slot (for one caption per video, ``i``'s own caption), not
``pooled[i, q]``. The true video's score is then the maximised cosine against the query's own
pooling, while every other video is scored against a pooling conditioned on another text, so
the true video wins even when the texts say nothing about the videos. We score the intended
definition. ``legacy_leaky_scoring=True`` reproduces the authors' numbers for comparison only:
it needs the ground truth (``text_to_video``, passed by :func:`tvr_models.evaluate.evaluate`)
and must never be used to report retrieval results. Where video ``i`` has fewer captions than
``q``'s slot the authors' padding gives NaN; the legacy score is ``-inf`` there.

Checkpoints: module and parameter names are the authors' (``pool_frames.cross_attn.q_proj``,
``stochastic.std_branch.linear_proj``, ...) so their state dicts load one to one (see
:mod:`tvr_models.checkpoints`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tvr_kernels.compat.tmass import caption_slots

from . import _ops
from ._modules import RetrievalModel, scale, symmetric_cross_entropy
from .clip import CLIPBackbone

PRIORS = ("uniform", "normal")

# Pairs pooled at once when the legacy scoring pools each video with its own captions.
_PAIR_BLOCK = 4096


def _identity_init(*linears: nn.Linear) -> None:
    # The authors start every linear at the identity (eye_ puts ones on the leading diagonal
    # of a non-square weight) so a fresh model pools like a plain attention average and the
    # radius is exp(S) on the first T dimensions, 1 elsewhere.
    for lin in linears:
        nn.init.eye_(lin.weight)
        nn.init.zeros_(lin.bias)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last dim (broadcasting), as the authors write it: each side divided by
    its norm, no epsilon (a zero vector gives NaN rather than a silent 0)."""
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


class CrossAttention(nn.Module):
    """The four projections of X-Pool's one-head attention (``q/k/v/out_proj``); the
    attention itself is computed by :class:`TextConditionedPooling`."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)


class TextConditionedPooling(nn.Module):
    """X-Pool's frame pooling (the authors' ``pool_frames``); see the module docstring.

    ``forward(text [Nt, D], frames [Nv, T, D]) -> [Nv, Nt, D]`` (video ``j`` pooled for text
    ``i`` at ``[j, i]``); with ``pairwise=True``, ``text [P, D], frames [P, T, D] -> [P, D]``.

    ``out_proj`` is applied to each frame's value before the attention average rather than to
    the average (the authors' order): it is affine and the weights sum to 1, so the result is
    the same up to rounding, and it costs a D x D product per frame instead of per pair.
    What is left per pair is the attention over T frames and ``linear_proj``.

    At evaluation, :meth:`pooled_block` computes a block from projections made once per text
    and per video (:meth:`project_text`, :meth:`project_frames`)."""

    def __init__(self, dim: int, dropout: float = 0.3):
        super().__init__()
        self.cross_attn = CrossAttention(dim)
        self.linear_proj = nn.Linear(dim, dim)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.layer_norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        a = self.cross_attn
        _identity_init(a.q_proj, a.k_proj, a.v_proj, a.out_proj, self.linear_proj)

    def project_text(self, text: Tensor) -> Tensor:
        """Queries [..., D] of texts [..., D]."""
        return self.cross_attn.q_proj(self.layer_norm1(text))

    def project_frames(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """(keys, values through ``out_proj``), each [..., T, D], of frames [..., T, D]."""
        f = self.layer_norm1(frames)
        a = self.cross_attn
        return a.k_proj(f), a.out_proj(a.v_proj(f))

    def combine(self, query: Tensor, keys: Tensor, values: Tensor, pairwise: bool = False) -> Tensor:
        """The per-pair part from projections: query [Nt, D], keys/values [Nv, T, D] ->
        [Nv, Nt, D]; ``pairwise``: query [P, D], keys/values [P, T, D] -> [P, D]."""
        root = math.sqrt(query.shape[-1])
        if pairwise:
            w = torch.softmax(torch.einsum("pkd,pd->pk", keys, query) / root, dim=-1)
            h = torch.einsum("pk,pkd->pd", w, values)
        else:
            w = torch.softmax(torch.einsum("vkd,td->vtk", keys, query) / root, dim=-1)
            h = torch.einsum("vtk,vkd->vtd", w, values)
        h = self.layer_norm2(h)
        return self.layer_norm3(h + self.dropout(self.linear_proj(h)))

    def forward(self, text: Tensor, frames: Tensor, pairwise: bool = False) -> Tensor:
        return self.combine(self.project_text(text), *self.project_frames(frames), pairwise)

    def pooled_block(self, query: Tensor, keys: Tensor, values: Tensor, offset: tuple[int, int],
                     tile: tuple[int, int] = (64, 16)) -> Tensor:
        """Pooling [Bv, Bt, D] of a block of an evaluation whose first text and video have
        global indices ``offset``, from ``query`` [Bt, D] and ``keys``/``values`` [Bv, T, D].

        Computed in tiles of ``tile = (texts, videos)`` laid on the *global* pair grid, each
        padded to its full size: every pair is computed by calls of one shape at one position
        within them, whatever the block sizes, so (matrix products being deterministic for a
        given shape, and independent across rows) the result does not depend on how the
        evaluation is chunked, to the last bit. Blocks aligned to the grid (the default chunk of
        128) waste nothing; others recompute the tiles they cut."""
        (i0, j0), (mt, mv) = offset, tile
        bt, bv = query.shape[0], keys.shape[0]
        out = query.new_empty(bv, bt, query.shape[1])
        q_tile = query.new_zeros(mt, query.shape[1])
        k_tile, v_tile = keys.new_zeros(mv, *keys.shape[1:]), values.new_zeros(mv, *values.shape[1:])
        for ti in range(i0 - i0 % mt, i0 + bt, mt):
            a, b = max(ti, i0), min(ti + mt, i0 + bt)          # global texts of this tile and block
            q_tile.zero_()
            q_tile[a - ti:b - ti] = query[a - i0:b - i0]
            for tj in range(j0 - j0 % mv, j0 + bv, mv):
                c, e = max(tj, j0), min(tj + mv, j0 + bv)
                k_tile.zero_()
                v_tile.zero_()
                k_tile[c - tj:e - tj] = keys[c - j0:e - j0]
                v_tile[c - tj:e - tj] = values[c - j0:e - j0]
                p = self.combine(q_tile, k_tile, v_tile)                       # [mv, mt, D]
                out[c - j0:e - j0, a - i0:b - i0] = p[c - tj:e - tj, a - ti:b - ti]
        return out


class SimilarityRadius(nn.Module):
    """The similarity-aware radius (the authors' ``std_branch``): ``R = exp(linear_proj(S))``,
    ``linear_proj = Linear(T -> D)``, ``S`` the T cosines of a text with a video's frames.
    Its weight [D, T] and bias [D] are the op's ``radius_weight`` / ``radius_bias``."""

    def __init__(self, num_frames: int, dim: int):
        super().__init__()
        self.linear_proj = nn.Linear(num_frames, dim)
        _identity_init(self.linear_proj)

    def forward(self, text: Tensor, frames: Tensor) -> Tensor:
        """Pairs: text [P, D], frames [P, T, D] -> R [P, D]."""
        return torch.exp(self.linear_proj(_cos(text[:, None, :], frames)))


class StochasticText(nn.Module):
    """The stochastic text ``t + eps * R`` of text-video pairs, ``eps`` from the prior."""

    def __init__(self, num_frames: int, dim: int, prior: str = "uniform", std: float = 1.0):
        super().__init__()
        self.std_branch = SimilarityRadius(num_frames, dim)
        self.prior, self.std = prior, std

    def sample_prior(self, like: Tensor) -> Tensor:
        """Prior samples shaped like ``like``, from torch's generator (as the authors'
        ``torch.rand_like`` / ``torch.normal``), so ``torch.manual_seed`` governs training."""
        if self.prior == "uniform":
            return torch.rand_like(like)
        return torch.randn_like(like) * self.std

    def forward(self, text: Tensor, frames: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pairs: text [P, D], frames [P, T, D] (, noise [P, D]) -> (stochastic text [P, D],
        radius R [P, D])."""
        radius = self.std_branch(text, frames)
        eps = self.sample_prior(text) if noise is None else noise
        return text + eps * radius, radius


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class TMASS(RetrievalModel):
    """T-MASS. ``backbone``: a :class:`CLIPBackbone` (its token shift layers, if any, stay
    inactive: T-MASS encodes frames as single images).

    Options: ``num_frames`` T; ``num_samples`` M stochastic texts per pair at evaluation (20,
    the authors' ``stochasic_trials``); ``prior`` ``"uniform"`` (``U[0, 1)``) or ``"normal"``
    (``N(0, std^2)``; the authors' LSMDC recipe uses ``std = 3e-3``); ``alpha`` the support
    loss weight (0.8, the authors' MSR-VTT recipe; their code defaults to 0); ``dropout`` in
    the pooling (0.3); ``seed`` the evaluation's Philox seed (see :meth:`set_selection`);
    ``legacy_leaky_scoring`` the authors' leaking evaluation (module docstring).

    Features: ``encode_text -> {"text": [Bt, D]}``, ``encode_video -> {"frames": [Bv, T, D]}``,
    neither normalised.
    """

    granularities = 1

    def __init__(self, backbone: CLIPBackbone, num_frames: int = 12, num_samples: int = 20,
                 prior: str = "uniform", std: float = 1.0, alpha: float = 0.8, dropout: float = 0.3,
                 seed: int = 0, legacy_leaky_scoring: bool = False):
        super().__init__()
        _check_choice("prior", prior, PRIORS)
        if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite number > 0, got {std!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha (the support loss weight) must be a finite number >= 0, got {alpha!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        d = backbone.embed_dim
        self.clip = backbone
        self.num_frames, self.num_samples, self.alpha = num_frames, num_samples, float(alpha)
        self.pool_frames = TextConditionedPooling(d, dropout)
        self.stochastic = StochasticText(num_frames, d, prior, float(std))
        self.seed = seed
        self.legacy_leaky_scoring = legacy_leaky_scoring

    @property
    def prior(self) -> str:
        return self.stochastic.prior

    @property
    def std(self) -> float:
        return self.stochastic.std

    # ------------------------------------------------------------------ encoders
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        """``{"text": [Bt, D]}``: the EOT feature (not normalised). The causal mask alone
        gives the EOT feature the authors' padding mask gives."""
        sentence, _ = self.clip.encode_text(input_ids)
        return {"text": sentence}

    def encode_video(self, video: Tensor, video_mask: Tensor) -> dict:
        """``{"frames": [Bv, T, D]}`` from ``video`` [Bv, T, 3, H, W] and ``video_mask``
        [Bv, T] (1 = real frame). A padded slot takes the feature of the nearest real frame
        before it (the first real frame if none precedes it): the authors' loader pads a short
        video by repeating its last frame, so pooling and radius see what theirs see."""
        if video.dim() != 5:
            raise ValueError(f"video must be [Bv, T, 3, H, W], got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        if t != self.num_frames:
            raise ValueError(f"video has {t} frames, the model was built for num_frames = {self.num_frames}")
        if tuple(video_mask.shape) != (b, t):
            raise ValueError(f"video_mask must be [Bv, T] = {(b, t)}, got {tuple(video_mask.shape)}")
        valid = video_mask.bool()
        empty = (~valid.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"video_mask rows {empty} have no valid frame")
        cls = self.clip.encode_image(video.flatten(0, 1))[:, 0].reshape(b, t, -1)   # [B, T, D]
        pos = torch.arange(t, device=valid.device).expand(b, t)
        last = torch.where(valid, pos, -1).cummax(dim=1).values
        idx = torch.where(last >= 0, last, valid.long().argmax(1, keepdim=True))
        return {"frames": cls.gather(1, idx[..., None].expand_as(cls))}

    # ------------------------------------------------------------------ checks
    def _check_features(self, text_feats: dict, video_feats: dict) -> tuple[Tensor, Tensor]:
        text, frames = text_feats["text"], video_feats["frames"]
        d = self.clip.embed_dim
        if text.dim() != 2 or text.shape[1] != d:
            raise ValueError(f"text features must be [Nt, D] with D = {d} (the model's joint dim), "
                             f"got {tuple(text.shape)}")
        if frames.dim() != 3 or frames.shape[1:] != (self.num_frames, d):
            raise ValueError(f"frame features must be [Nv, T, D] with T = {self.num_frames} frames "
                             f"and D = {d}, got {tuple(frames.shape)}")
        return text, frames

    # ------------------------------------------------------------------ training
    def _training_terms(self, text_feats: dict, video_feats: dict, noise: Tensor | None):
        """(text [B, D], pooled [Bt, Bv, D], stochastic texts [B, D], radii [B, D])."""
        text, frames = self._check_features(text_feats, video_feats)
        b = text.shape[0]
        if frames.shape[0] != b:
            raise ValueError(f"training needs matching pairs: {b} texts but {frames.shape[0]} videos")
        if noise is not None and tuple(noise.shape) != tuple(text.shape):
            raise ValueError(f"noise must be [B, D] = {tuple(text.shape)}, got {tuple(noise.shape)}")
        pooled = self.pool_frames(text, frames).transpose(0, 1)
        # the radius of caption i comes from its own video, as in the authors' training
        stochastic, radius = self.stochastic(text, frames, noise)
        return text, pooled, stochastic, radius

    def training_losses(self, text_feats: dict, video_feats: dict, noise: Tensor | None = None) -> dict:
        """Losses of a batch of matching pairs (text ``i`` describes video ``i``).

        ``noise`` [B, D]: the prior samples to use (default: drawn from torch's generator).
        Returns ``{"loss", "support", "total"}`` with ``total = loss + alpha * support``."""
        text, pooled, stochastic, radius = self._training_terms(text_feats, video_feats, noise)
        ls = scale(self.clip.logit_scale)
        loss = symmetric_cross_entropy(ls * _cos(stochastic[:, None, :], pooled))
        pointer = pooled.mean(0) - text                          # video i's mean pooling - t_i
        support = text + pointer / pointer.norm(dim=-1, keepdim=True) * radius
        support_loss = symmetric_cross_entropy(ls * _cos(support[:, None, :], pooled))
        return {"loss": loss, "support": support_loss, "total": loss + self.alpha * support_loss}

    def training_logits(self, text_feats: dict, video_feats: dict, noise: Tensor | None = None) -> Tensor:
        """[B, B] logits of the stochastic texts (the support term left out)."""
        _, pooled, stochastic, _ = self._training_terms(text_feats, video_feats, noise)
        return scale(self.clip.logit_scale) * _cos(stochastic[:, None, :], pooled)

    def loss(self, text_feats: dict, video_feats: dict) -> Tensor:
        """Training loss ``loss + alpha * support`` of a batch of matching pairs (``forward``
        encodes, gathers over ranks and calls this)."""
        return self.training_losses(text_feats, video_feats)["total"]

    # ------------------------------------------------------------------ evaluation
    def set_selection(self, *, hard: bool | None = None, seed: int | None = None) -> None:
        """Evaluation sampling: ``seed`` is the Philox seed of the stochastic texts; ``None``
        draws one now from torch's generator (one seed for the whole evaluation, so chunks
        stay consistent). T-MASS has no token selection: ``hard=True`` is refused."""
        if hard:
            raise ValueError("T-MASS has no token selection: hard top-k does not apply")
        self.seed = int(torch.randint(0, 2 ** 62, ())) if seed is None else seed

    def prepare_scoring(self, text_feats: dict, video_feats: dict, text_to_video=None) -> tuple[dict, dict]:
        """Once before scoring: the pooling's projections of every text (``"query"`` [Nt, D])
        and video (``"keys"``, ``"values"`` [Nv, T, D]), made once so that no block's
        scores depend on the blocks' sizes.

        With ``legacy_leaky_scoring`` also the ground truth the authors' evaluation leaks:
        each text's ``"slot"`` [Nt] (its place among its video's captions, in text order) and
        each video's pooling for its own captions, ``"own_pooled"`` [Nv, K, D] with
        ``"own_valid"`` [Nv, K] (K = most captions of one video). ``text_to_video`` [Nt]
        (None: text ``i`` describes video ``i``)."""
        text, frames = self._check_features(text_feats, video_feats)
        query = self.pool_frames.project_text(text)
        keys, values = self.pool_frames.project_frames(frames)
        text_feats, video_feats = {**text_feats, "query": query}, {**video_feats, "keys": keys, "values": values}
        if not self.legacy_leaky_scoring:
            return text_feats, video_feats
        nt, nv = text.shape[0], frames.shape[0]
        if text_to_video is None:
            if nt != nv:
                raise ValueError(f"legacy_leaky_scoring needs text_to_video (the ground truth it leaks) "
                                 f"when texts ({nt}) != videos ({nv})")
            t2v = torch.arange(nt, device=text.device)
        else:
            t2v = torch.as_tensor(text_to_video, device=text.device).long()
            if tuple(t2v.shape) != (nt,) or (nt and (t2v.min() < 0 or t2v.max() >= nv)):
                raise ValueError(f"text_to_video must be [Nt] = [{nt}] video indices in [0, {nv}), "
                                 f"got shape {tuple(t2v.shape)}")
        slot, k = caption_slots(t2v, nv)
        own = torch.full((nv, k), -1, dtype=torch.long, device=t2v.device)
        own[t2v, slot] = torch.arange(nt, device=t2v.device)
        own_pooled = text.new_zeros(nv, k, text.shape[1])
        for p0 in range(0, nt, _PAIR_BLOCK):
            q = torch.arange(p0, min(nt, p0 + _PAIR_BLOCK), device=t2v.device)
            v = t2v[q]
            own_pooled[v, slot[q]] = self.pool_frames.combine(query[q], keys[v], values[v], pairwise=True)
        video_feats.update(own_pooled=own_pooled, own_valid=own >= 0)
        return {**text_feats, "slot": slot}, video_feats

    def score(self, text_feats: dict, video_feats: dict) -> Tensor:
        """[1, Bt, Bv] logits of a block that starts at text 0 and video 0."""
        return self.score_chunk(text_feats, video_feats, (0, 0))

    def score_chunk(self, text_feats: dict, video_feats: dict, offset: tuple[int, int]) -> Tensor:
        """[1, Bt, Bv] evaluation logits ``exp(ls) * max_m cos(t + eps_m R, pooled[j, i])`` of a
        block whose first text and video have global indices ``offset``: the op's
        ``pair_offset`` (each pair draws its own noise, whatever the blocks) and the pooling's
        tile grid. The block's pooling [Bv, Bt, D] is its only pair-sized tensor. Projections
        missing from the features (no :meth:`prepare_scoring`) are made here."""
        text, frames = self._check_features(text_feats, video_feats)
        pool = self.pool_frames
        query = text_feats["query"] if "query" in text_feats else pool.project_text(text)
        if "keys" in video_feats:
            keys, values = video_feats["keys"], video_feats["values"]
        else:
            keys, values = pool.project_frames(frames)
        pooled = pool.pooled_block(query, keys, values, offset)                   # [Bv, Bt, D]
        lin = self.stochastic.std_branch.linear_proj
        kw = dict(prior=self.prior, std=self.std, seed=self.seed, pair_offset=tuple(offset))
        sims, best = _ops.op("stochastic_max_similarity")(text, frames, pooled, lin.weight, lin.bias,
                                                          self.num_samples, **kw)
        if self.legacy_leaky_scoring:
            sims = self._leaky(text_feats, video_feats, best, kw)
        return (scale(self.clip.logit_scale) * sims)[None]

    def _leaky(self, text_feats: dict, video_feats: dict, best: Tensor, kw: dict) -> Tensor:
        """The authors' final score of a block: the selected stochastic text (selected, as
        theirs, against the query-conditioned pooling) against video ``j``'s pooling for its
        own caption in the query's slot. [Bt, Bv]; -inf where video ``j`` has no such caption."""
        if "slot" not in text_feats or "own_pooled" not in video_feats:
            raise RuntimeError("legacy_leaky_scoring needs prepare_scoring(text_feats, video_feats, "
                               "text_to_video) first (tvr_models.evaluate.score_features calls it)")
        text, frames = text_feats["text"], video_feats["frames"]
        lin = self.stochastic.std_branch.linear_proj
        chosen = _ops.op("stochastic_text_embedding")(text, frames, lin.weight, lin.bias, best,
                                                      **kw)                        # [Bt, Bv, D]
        slot, own, ok = text_feats["slot"], video_feats["own_pooled"], video_feats["own_valid"]
        k = slot.clamp(max=max(own.shape[1] - 1, 0))
        target = own[:, k].transpose(0, 1)                                           # [Bt, Bv, D]
        ok = ok[:, k].t() & (slot < own.shape[1])[:, None]
        return _cos(chosen, target).masked_fill(~ok, float("-inf"))


# ---------------------------------------------------------------------- the authors' evaluation
def authors_pooling(pool: TextConditionedPooling, text: Tensor, frames: Tensor) -> Tensor:
    """X-Pool's pooling in the authors' order: the [Nv, Nt, D] attention average, then
    ``out_proj``, LayerNorm, residual linear, LayerNorm, every step pair-sized. [Nv, Nt, D]."""
    a = pool.cross_attn
    t, f = pool.layer_norm1(text), pool.layer_norm1(frames)
    q, k, v = a.q_proj(t), a.k_proj(f), a.v_proj(f)
    w = torch.softmax(torch.einsum("vkd,td->vtk", k, q) / math.sqrt(q.shape[-1]), dim=-1)
    h = pool.layer_norm2(a.out_proj(torch.einsum("vtk,vkd->vtd", w, v)))
    return pool.layer_norm3(h + pool.dropout(pool.linear_proj(h)))


def authors_evaluation_bytes(num_texts: int, num_videos: int, dim: int, max_captions: int = 1) -> int:
    """Peak memory of :func:`authors_evaluation` in bytes, about ``4 * (4 Nv^2 K D + K Nv^3)``:
    the regrouped texts and poolings [Nv, Nv, K, D] with their normalised copies, and the
    [Nv*K, Nv, Nv] product (measured within 5 % at Nv = Nt = 200-600, D = 512: 11.4 GiB at
    1000). ``num_texts`` only bounds K."""
    nv, k = num_videos, min(max_captions, max(num_texts, 1))
    return 4 * (4 * nv * nv * k * dim + k * nv ** 3)


@torch.no_grad()
def authors_evaluation(model: TMASS, text: Tensor, frames: Tensor, text_to_video=None,
                       noise: Tensor | None = None, return_margin: bool = False):
    """The authors' released evaluation re-enacted eagerly at feature level, for comparison
    only: tests check ``legacy_leaky_scoring`` against it, benchmarks/bench_tmass_eval.py
    measures its cost. It leaks the ground truth (module docstring).

    As theirs: every video pooled for every text at once (:func:`authors_pooling`); per
    video, ``M`` stochastic texts of every text through their radius module (recomputed for
    each sample, repeated-text product included), the best against that video's pooling kept
    in a [Nv, Nt, D] tensor; texts and poolings regrouped per video into [Nv, Nv, K, D]
    tensors padded with -inf; normalised copies; one batched product [Nv*K, Nv, Nv] whose
    diagonal is kept. Peak memory: :func:`authors_evaluation_bytes` (11.4 GiB at
    1000 x 1000, D = 512). Their Python loop copying each selected text row is one indexing
    here: it only cost time.

    Args:
        model: a :class:`TMASS` (its pooling, radius, ``num_samples``, prior).
        text: [Nt, D]; frames: [Nv, T, D].
        text_to_video: [Nt] (None: text ``i`` describes video ``i``).
        noise: [Nt, Nv, M, D] prior samples (None: drawn per sample from torch's generator,
            as theirs).
        return_margin: also return the [Nt, Nv] margin between the best and the second best
            sample of each selection (near ties make comparisons ambiguous).

    Returns:
        [Nt, Nv] cosines, NaN where video ``j`` has no caption in text ``i``'s slot (their
        padding); with ``return_margin``, ``(scores, margin)``.
    """
    from tvr_kernels.reference.stochastic_max_similarity import authors_stochastic_text
    nt, (nv, _, d) = text.shape[0], frames.shape
    t2v = torch.arange(nt) if text_to_video is None else torch.as_tensor(text_to_video).long()
    slot, k = caption_slots(t2v, nv)
    lin = model.stochastic.std_branch.linear_proj
    pooled = authors_pooling(model.pool_frames, text, frames)                    # [Nv, Nt, D]
    allpairs = torch.zeros(nv, nt, d, dtype=text.dtype)
    margin = torch.full((nt, nv), float("inf"))
    rows = torch.arange(nt)
    for j in range(nv):
        rep = frames[j][None].repeat(nt, 1, 1)
        trials = torch.stack([authors_stochastic_text(text, rep, lin.weight, lin.bias,
                                                      model.stochastic.sample_prior(text)
                                                      if noise is None else noise[:, j, s])
                              for s in range(model.num_samples)])               # [M, Nt, D]
        trials = trials / trials.norm(dim=-1, keepdim=True)
        target = pooled[j] / pooled[j].norm(dim=-1, keepdim=True)
        sel = (trials * target).sum(-1)                                          # [M, Nt]
        if return_margin and model.num_samples > 1:
            top = sel.topk(2, dim=0).values
            margin[:, j] = top[0] - top[1]
        allpairs[j] = trials[sel.argmax(0), rows]
    text_per = torch.full((nv, nv, k, d), float("-inf"), dtype=text.dtype)
    pooled_per = torch.full((nv, nv, k, d), float("-inf"), dtype=text.dtype)
    text_per[:, t2v, slot] = allpairs
    pooled_per[:, t2v, slot] = pooled
    del allpairs, pooled
    tn = text_per / text_per.norm(dim=-1, keepdim=True)
    pn = pooled_per / pooled_per.norm(dim=-1, keepdim=True)
    sims = torch.bmm(tn.permute(0, 2, 1, 3).reshape(nv * k, nv, d),
                     pn.permute(1, 2, 3, 0).reshape(nv * k, d, nv)).view(nv, k, nv, nv)
    diag = torch.stack([sims[i, :, :, i] for i in range(nv)], dim=-1)            # [K, Nv(b), Nv(i)]
    out = diag[slot, t2v]                                                        # [Nt, Nv]
    return (out, margin) if return_margin else out


def tiny_tmass(num_frames: int = 4, **kw) -> TMASS:
    """A tiny random T-MASS for tests and the demo (the tiny CLIP of :func:`tiny_ts2net`,
    without token shift). ``kw`` goes to :class:`TMASS`."""
    from .ts2net import TINY_CLIP
    bb = CLIPBackbone.from_config(**{**TINY_CLIP, "shift_layers": ()})
    return TMASS(bb, num_frames=num_frames, **kw)
