"""TokenBinder (Zhang et al., WACV 2025, arXiv 2409.19865) on the CLIP backbone.

The authors' announced repository is empty: no official code or weights exist, so this is
our reading of the paper. Where the paper is silent we chose (details in
``shared/TOKENBINDER.md``); every choice marked **ours** below is a constructor parameter or
stated as fixed.

From the paper:

* **query binding**: ``M`` learnable query-indicator tokens go through the CLIP text encoder
  with the caption; their outputs ``I_1 .. I_M`` carry the query. ``M = 4`` (the paper's best).
* **broad view (stage 1)**: ``S'[i, j] = cos(I_1(i), f_j)``, ``f_j`` the video's global
  feature, over the whole gallery; the top ``K`` videos per query are its candidates.
  ``K = 10`` (the paper's best).
* **focused view (stage 2)**: one cross-attention block between the other indicators
  ``I_2 .. I_M`` and the frame features of the ``K`` candidates *together*, a Gumbel selection
  of the candidates, an MLP giving one score delta per candidate; the final score is
  ``S[i, c_k] = S'[i, c_k] + Delta_k`` for the candidates, ``S'`` elsewhere.
* **loss**: ``(l_t2v + l_v2t) / 2`` on the broad view plus ``(l_focus_v + l_focus_t) / 2`` on
  the focused view; temperature: CLIP's logit scale (clamped at ln 100).

Ours, where the paper is silent:

* indicators appended right after each caption's EOT token (the padding slots), so CLIP's
  causal mask lets each see the whole caption and nothing of the padding, and the caption's
  own features are unchanged; read after ``ln_final`` and the text projection; initialised
  ``N(0, 0.02)`` like CLIP's token embeddings (``num_indicators``);
* global video feature: mean of the valid frames' projected CLS features, normalised; no
  token shift by default (the paper builds on CLIP-ViP; ``token_shift=True`` turns on the
  backbone's ``tk.token_shift`` layers);
* the Gumbel selection is the *candidate* selection: in training, ``tk.perturbed_topk`` with
  ``distribution="gumbel"`` over each query's in-batch broad scores (cosines; ``sigma``,
  ``num_samples``, ``topk_gradient``) gives soft indicators ``[B, K, B]``; candidate frames are
  their mixtures (``einsum("tkv,vfd->tkfd")``) and the deltas are spread back with the same
  indicators, so the focused loss also trains the broad view through the selection. A query
  whose ground-truth video is not in the (unperturbed) top-K of its broad scores gets it in
  the last slot instead. At evaluation the selection is the hard top-K (deterministic);
  ``K`` shrinks to the number of videos when a batch or gallery has fewer;
* candidate slots are ordered by gallery index, ascending (the order ``tk.perturbed_topk``'s
  indicators have), in training and at evaluation alike;
* focused view: pre-LN block; queries ``I_2 .. I_M``; keys/values the ``K * T`` candidate
  frame features plus a learned candidate-slot embedding (padded frames masked);
  ``focus_heads`` heads (8), MLP ratio ``focus_mlp_ratio`` (4, GELU); delta MLP
  ``concat(I'_2 .. I'_M) -> D -> GELU -> K`` with the output layer starting at zero, so an
  untrained focused view leaves the broad ranking as it is;
* focused losses on the in-batch final similarity (logit-scaled): ``l_focus_v`` the
  cross-entropy over rows, ``l_focus_t`` over columns;
* evaluation (:meth:`TokenBinder.rerank`): stage 1 is the chunked ``[Nt, Nv]`` broad matrix,
  stage 2 runs the focused view on each query's ``K`` candidates only, ``Nt * K`` fusions in
  chunks of texts, independent of ``Nv``. Exact ties at the K-th place go as ``torch.topk``
  decides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops
from ._modules import RetrievalModel, masked_mean, scale, symmetric_cross_entropy
from .clip import CLIPBackbone


def _check_shape(name: str, x: Tensor, want: tuple, doc: str) -> None:
    """Raise ``ValueError`` unless ``x`` has ``len(want)`` dims matching ``want`` (None: any)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor {doc}, got {type(x).__name__}")
    if x.ndim != len(want) or any(w is not None and s != w for s, w in zip(x.shape, want)):
        raise ValueError(f"{name} must be {doc}, got {tuple(x.shape)}")


class FocusedView(nn.Module):
    """Stage 2: the query indicators attend over the candidates' frames, an MLP scores them.

    ``queries`` [B, Q, D] (``I_2 .. I_M``), ``candidates`` [B, k, T, D] (frame features of the
    ``k <= K`` candidates, gathered or soft mixtures), ``candidate_mask`` [B, k, T] (nonzero =
    valid frame) -> deltas [B, k], one per candidate slot."""

    def __init__(self, dim: int, num_queries: int, num_candidates: int, heads: int = 8,
                 mlp_ratio: int = 4):
        super().__init__()
        # without it the block could not tell the candidates apart: the keys are one set
        self.slot_embedding = nn.Parameter(torch.randn(num_candidates, dim) * 0.02)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.delta = nn.Sequential(nn.Linear(num_queries * dim, dim), nn.GELU(), nn.Linear(dim, num_candidates))
        nn.init.zeros_(self.delta[2].weight)
        nn.init.zeros_(self.delta[2].bias)

    def attend(self, q: Tensor, kv: Tensor, ignore: Tensor) -> Tensor:
        """``self.attn(q, kv, kv, key_padding_mask=ignore)`` ([B, Q, D] over [B, J, D]) in
        another order of the same products: each head's query is taken into the key space
        (``W_k^T q``) and the values are mixed before ``W_v``. With Q = M-1 queries and J = K*T
        keys per text that costs ``Q * heads * J * D`` against the ``2 * J * D^2`` of projecting
        every key and value: 20x fewer multiply-adds at D = 512, K*T = 120. ``b_k`` moves every
        logit of a query by the same amount and the weights sum to one, so the biases need no
        keys either."""
        a = self.attn
        h, d = a.num_heads, q.shape[-1]
        wq, wk, wv = a.in_proj_weight.chunk(3)
        bq, _, bv = a.in_proj_bias.chunk(3)
        qh = F.linear(q, wq, bq).unflatten(-1, (h, d // h)) * (d // h) ** -0.5     # [B, Q, H, dh]
        qk = torch.einsum("bqhe,hed->bqhd", qh, wk.view(h, d // h, d))             # [B, Q, H, D]
        logits = torch.einsum("bqhd,bjd->bqhj", qk, kv)
        logits = logits.masked_fill(ignore[:, None, None, :], float("-inf"))
        mixed = torch.einsum("bqhj,bjd->bqhd", logits.softmax(dim=-1), kv)         # [B, Q, H, D]
        out = torch.einsum("bqhd,hed->bqhe", mixed, wv.view(h, d // h, d)) + bv.view(h, d // h)
        return a.out_proj(out.flatten(2))

    def forward(self, queries: Tensor, candidates: Tensor, candidate_mask: Tensor) -> Tensor:
        b, k, t, d = candidates.shape
        kv = self.ln_kv(candidates + self.slot_embedding[:k, None, :]).reshape(b, k * t, d)
        ignore = candidate_mask.reshape(b, k * t) == 0
        # a query whose every key is masked would get NaN from the softmax; let it see them all
        ignore = ignore & ~ignore.all(-1, keepdim=True)
        x = queries + self.attend(self.ln_q(queries), kv, ignore)
        x = x + self.mlp(self.ln_mlp(x))
        return self.delta(x.flatten(1))[:, :k]


class TokenBinder(RetrievalModel):
    """TokenBinder. ``backbone``: a :class:`CLIPBackbone`.

    Paper: ``num_indicators`` M (4), ``num_candidates`` K (10). Ours (see the module
    docstring): ``focus_heads`` (8) and ``focus_mlp_ratio`` (4) of the focused-view block;
    ``num_samples`` (500), ``sigma`` (0.05, on cosine scores) and ``topk_gradient``
    (``"diagonal"`` or ``"full"``, see ``tk.perturbed_topk``) of the training-time Gumbel
    candidate selection; ``token_shift`` (False) runs the backbone's token-shift layers;
    ``num_frames`` T is what :meth:`encode_video` accepts.

    Features: ``encode_text -> {"broad": [Bt, D] normalised I_1, "queries": [Bt, M-1, D]}``,
    ``encode_video -> {"video": [Bv, D] normalised, "frames": [Bv, T, D] (padded frames
    zeroed), "mask": [Bv, T]}``. ``score`` gives the broad view (stage 1, pairwise);
    :meth:`rerank` adds the focused view's deltas (stage 2); the evaluation driver
    (``tvr_models.evaluate.score_features``) calls both.
    """

    granularities = 1
    # No released weights exist: load_official_checkpoint refuses, model.load_state_dict loads
    # dicts saved from this implementation.
    official_checkpoint = False

    def __init__(self, backbone: CLIPBackbone, num_frames: int = 12, num_indicators: int = 4,
                 num_candidates: int = 10, focus_heads: int = 8, focus_mlp_ratio: int = 4,
                 num_samples: int = 500, sigma: float = 0.05, topk_gradient: str = "diagonal",
                 token_shift: bool = False):
        super().__init__()
        from tvr_kernels.reference.perturbed_topk import GRADIENTS
        d = backbone.embed_dim
        if num_indicators < 2:
            raise ValueError(f"num_indicators must be >= 2 (I_1 for the broad view, the rest for the "
                             f"focused view), got {num_indicators}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if d % focus_heads:
            raise ValueError(f"focus_heads {focus_heads} must divide the joint dim D = {d}")
        if topk_gradient not in GRADIENTS:
            raise ValueError(f"topk_gradient must be one of {GRADIENTS}, got {topk_gradient!r}")
        self.clip = backbone
        self.num_frames, self.num_indicators, self.num_candidates = num_frames, num_indicators, num_candidates
        self.num_samples, self.sigma, self.topk_gradient = num_samples, sigma, topk_gradient
        self.token_shift = token_shift
        width = backbone.clip.config.text_config.hidden_size
        self.query_indicators = nn.Parameter(torch.randn(num_indicators, width) * 0.02)
        self.focused = FocusedView(d, num_indicators - 1, num_candidates, focus_heads, focus_mlp_ratio)
        self.hard_selection = False
        self.seed: int | None = None

    # ------------------------------------------------------------------ encoders
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        """``input_ids`` [Bt, L] (SOT ... EOT, padding 0) -> ``{"broad": [Bt, D] (I_1,
        normalised), "queries": [Bt, M-1, D] (I_2 .. I_M)}``.

        The indicators take the M positions after each caption's EOT; the sequence is cut
        (or zero-padded) to the longest caption plus M, which must fit CLIP's context."""
        _check_shape("input_ids", input_ids, (None, None), "[Bt, L] token ids")
        m, b = self.num_indicators, input_ids.shape[0]
        length = input_ids.argmax(dim=-1) + 1                                   # through EOT
        need = int(length.max()) + m
        if need > self.clip.context_length:
            raise ValueError(f"input_ids: a caption of {need - m} tokens (through EOT) plus "
                             f"{m} query indicators needs {need} positions, the text encoder has "
                             f"{self.clip.context_length}; shorten the captions or lower num_indicators")
        ids = F.pad(input_ids, (0, max(0, need - input_ids.shape[1])))[:, :need]
        emb = self.clip.clip.text_model.embeddings.token_embedding(ids)         # [Bt, W, width]
        slots = length[:, None] + torch.arange(m, device=ids.device)            # [Bt, M]
        emb = emb.scatter(1, slots[..., None].expand(-1, -1, emb.shape[-1]),
                          self.query_indicators.to(emb.dtype).expand(b, -1, -1))
        _, tokens = self.clip.encode_text(ids, inputs_embeds=emb)               # [Bt, W, D]
        ind = tokens.gather(1, slots[..., None].expand(-1, -1, tokens.shape[-1]))
        return {"broad": F.normalize(ind[:, 0], dim=-1), "queries": ind[:, 1:]}

    def encode_video(self, video: Tensor, video_mask: Tensor) -> dict:
        """``video`` [Bv, T, 3, H, W], ``video_mask`` [Bv, T] -> ``{"video": [Bv, D],
        "frames": [Bv, T, D], "mask": [Bv, T]}`` (see the class docstring)."""
        _check_shape("video", video, (None, None, 3, None, None), "[Bv, T, 3, H, W]")
        b, t = video.shape[:2]
        if t != self.num_frames:
            raise ValueError(f"video has {t} frames, the model was built for num_frames = {self.num_frames}")
        _check_shape("video_mask", video_mask, (b, t), f"[Bv, T] = [{b}, {t}] like video")
        tokens = self.clip.encode_image(video.flatten(0, 1), num_frames=t if self.token_shift else None)
        mask = video_mask.to(tokens.dtype)
        frames = tokens[:, 0].reshape(b, t, -1) * mask[..., None]
        return {"video": F.normalize(masked_mean(frames, video_mask), dim=-1), "frames": frames,
                "mask": video_mask}

    # ------------------------------------------------------------------ checks
    def _check_text(self, tf: dict) -> None:
        d, q = self.clip.embed_dim, self.num_indicators - 1
        _check_shape("text_feats['broad']", tf["broad"], (None, d), f"[Nt, D] with D = {d}")
        nt = tf["broad"].shape[0]
        _check_shape("text_feats['queries']", tf["queries"], (nt, q, d),
                     f"[Nt, M-1, D] = [{nt}, {q}, {d}] (num_indicators M = {self.num_indicators})")

    def _check_video(self, vf: dict) -> None:
        d = self.clip.embed_dim
        _check_shape("video_feats['video']", vf["video"], (None, d), f"[Nv, D] with D = {d}")
        nv = vf["video"].shape[0]
        _check_shape("video_feats['frames']", vf["frames"], (nv, None, d), f"[Nv, T, D] = [{nv}, T, {d}]")
        t = vf["frames"].shape[1]
        _check_shape("video_feats['mask']", vf["mask"], (nv, t), f"[Nv, T] = [{nv}, {t}]")

    # ------------------------------------------------------------------ views
    def score(self, text_feats: dict, video_feats: dict) -> Tensor:
        """Broad view (stage 1) of a block: ``[1, Bt, Bv]`` logit-scaled cosines of I_1 with
        the videos' global features."""
        self._check_text(text_feats)
        self._check_video(video_feats)
        return (scale(self.clip.logit_scale) * text_feats["broad"] @ video_feats["video"].t())[None]

    def finalize(self, sims: Tensor, bank_sims: Tensor | None = None) -> Tensor:
        """The broad matrix itself (no copy: :meth:`rerank` then raises its top-K in place).
        A text bank has no role in TokenBinder and is ignored."""
        return sims[0]

    @staticmethod
    def select_candidates(scores: Tensor, k: int) -> Tensor:
        """Hard top-``k`` of each row of ``scores`` [b, Nv] -> indices [b, k], ascending
        (the slot order ``tk.perturbed_topk`` gives in training)."""
        return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values

    @torch.no_grad()
    def rerank(self, sim: Tensor, text_feats: dict, video_feats: dict, chunk_size: int = 128,
               progress: bool = False, video_offset: int | None = None) -> Tensor:
        """Stage 2 over a gallery: each row of the broad matrix ``sim`` [Nt, Nv] (from
        :meth:`score`) gets ``exp(logit_scale) * Delta_k`` added at its top-K videos, in place.

        ``chunk_size`` texts at a time: peak memory is one chunk's ``[chunk, K, T, D]``
        candidate frames and the block's activations; the cost is ``Nt * K`` candidate
        fusions whatever ``Nv``.

        ``video_offset``: a sharded evaluation (:mod:`tvr_models.sharded`; every rank calls
        this): ``sim`` and ``video_feats`` hold this rank's videos, the gallery's from
        ``video_offset`` on. The candidates are then chosen over the whole gallery and each
        rank adds the deltas that fall in its columns (as one process would)."""
        from . import sharded
        self._check_text(text_feats)
        self._check_video(video_feats)
        nt, nv = text_feats["broad"].shape[0], video_feats["video"].shape[0]
        _check_shape("sim", sim, (nt, nv), f"[Nt, Nv] = [{nt}, {nv}]")
        from tqdm.auto import tqdm
        total = nv if video_offset is None else int(sharded.D.all_reduce_sum(torch.tensor([nv], device=sim.device)).item())
        k = min(self.num_candidates, total)
        ls = scale(self.clip.logit_scale)
        starts = range(0, nt, chunk_size)
        for i in tqdm(starts, desc="focused view", disable=not progress or len(starts) < 4):
            rows = sim[i:i + chunk_size]                                        # a view: updated in place
            queries = text_feats["queries"][i:i + chunk_size]
            if video_offset is None:
                idx = self.select_candidates(rows, k)                           # [c, k]
                delta = self.focused(queries, video_feats["frames"][idx], video_feats["mask"][idx])
                rows.scatter_add_(1, idx, (ls * delta).to(sim.dtype))
                continue
            idx = sharded.global_candidates(rows, k, video_offset)
            delta = self.focused(queries, sharded.take_rows(video_feats["frames"], idx, video_offset),
                                 sharded.take_rows(video_feats["mask"], idx, video_offset))
            sharded.add_at_columns(rows, idx, (ls * delta).to(sim.dtype), video_offset)
        return sim

    # ------------------------------------------------------------------ training
    def set_selection(self, *, hard: bool | None = None, seed: int | None = None) -> None:
        """Training-time candidate selection: ``hard`` top-K (no gradient through it) or the
        Gumbel-perturbed one with noise ``seed`` (``None``: drawn from torch's generator).
        Evaluation always selects hard."""
        if hard is not None:
            self.hard_selection = hard
        self.seed = seed

    def _bind_ground_truth(self, ind: Tensor, broad: Tensor) -> Tensor:
        """The last slot of a query whose ground truth (video i for text i) is outside the
        top-K of its broad scores becomes that video, so the focused loss sees it."""
        b, k, _ = ind.shape
        gt = torch.arange(b, device=ind.device)
        absent = (self.select_candidates(broad.detach(), k) != gt[:, None]).all(dim=-1)   # [B]
        if not bool(absent.any()):
            return ind
        last = torch.where(absent[:, None], F.one_hot(gt, b).to(ind.dtype), ind[:, -1])
        return torch.cat([ind[:, :-1], last[:, None]], dim=1)

    def training_similarities(self, text_feats: dict, video_feats: dict) -> tuple[Tensor, Tensor]:
        """In-batch ``(broad S', final S)``, both [B, B] cosine-scale (not logit-scaled);
        text i matches video i. The candidates are chosen by ``tk.perturbed_topk`` (Gumbel)."""
        broad = text_feats["broad"] @ video_feats["video"].t()                              # [B, B]
        b = broad.shape[0]
        k = min(self.num_candidates, b)
        ind = _ops.perturbed_topk(broad, k, self.num_samples, self.sigma, seed=self.seed,
                                  hard=self.hard_selection, gradient=self.topk_gradient,
                                  distribution="gumbel")                                     # [B, k, B]
        ind = self._bind_ground_truth(ind.to(broad.dtype), broad)
        frames, mask = video_feats["frames"], video_feats["mask"].to(broad.dtype)
        candidates = torch.einsum("tkv,vfd->tkfd", ind, frames)                             # [B, k, T, D]
        # a mixed slot's frame is valid where any of the videos it mixes has it
        cand_mask = torch.einsum("tkv,vf->tkf", ind.detach(), mask)
        delta = self.focused(text_feats["queries"], candidates, cand_mask)                  # [B, k]
        return broad, broad + torch.einsum("tk,tkv->tv", delta, ind)

    def training_logits(self, text_feats: dict, video_feats: dict) -> Tensor:
        """The logit-scaled in-batch final similarity [B, B]."""
        return scale(self.clip.logit_scale) * self.training_similarities(text_feats, video_feats)[1]

    def losses(self, text_feats: dict, video_feats: dict) -> dict:
        """``{"broad": (l_t2v + l_v2t) / 2, "focus": (l_focus_v + l_focus_t) / 2, "loss": their sum}``."""
        broad, final = self.training_similarities(text_feats, video_feats)
        ls = scale(self.clip.logit_scale)
        lb, lf = symmetric_cross_entropy(ls * broad), symmetric_cross_entropy(ls * final)
        return {"broad": lb, "focus": lf, "loss": lb + lf}

    def loss(self, text_feats: dict, video_feats: dict) -> Tensor:
        """``losses(...)["loss"]``."""
        return self.losses(text_feats, video_feats)["loss"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, video: Tensor, video_mask: Tensor,
                loss_seed: int | None = None) -> Tensor:
        """Training loss of a batch of matching pairs (text i describes video i); gathered
        over ranks under ``torch.distributed`` (:meth:`RetrievalModel.forward`)."""
        if input_ids.shape[0] != video.shape[0]:
            raise ValueError(f"training pairs: input_ids has {input_ids.shape[0]} captions but video "
                             f"{video.shape[0]} videos (caption i must describe video i)")
        return super().forward(input_ids, attention_mask, video, video_mask, loss_seed)

    # ------------------------------------------------------------------ weights
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after checking that ``state_dict`` is a TokenBinder's
        of this model's sizes (a leading ``module.`` is stripped); another model's state dict
        or other sizes raise ``ValueError`` naming what is wrong."""
        from .checkpoints import identify_model
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        other = identify_model(sd)
        if other not in (None, "TokenBinder") or (strict and "query_indicators" not in sd):
            what = f"a {other} state dict" if other else "not a TokenBinder state dict"
            raise ValueError(f"state_dict is {what}: it has no 'query_indicators' (keys start "
                             f"{sorted(sd)[:3]}); TokenBinder has no official checkpoint, load one "
                             f"saved from this implementation")
        own = self.state_dict()
        governs = {"query_indicators": "num_indicators / text width",
                   "focused.slot_embedding": "num_candidates / D",
                   "focused.delta.0.weight": "num_indicators / D",
                   "focused.delta.2.weight": "num_candidates", "focused.delta.2.bias": "num_candidates"}
        bad = [f"{k}: state_dict {tuple(v.shape)} vs model {tuple(own[k].shape)}"
               + (f" ({governs[k]})" if k in governs else "")
               for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError("TokenBinder state_dict built with other sizes:\n  " + "\n  ".join(bad))
        return super().load_state_dict(sd, strict=strict, assign=assign)


def tiny_tokenbinder(num_frames: int = 4, **kw) -> TokenBinder:
    """A tiny random TokenBinder for tests and the demo (tiny CLIP, M = 4, K = 3)."""
    from .ts2net import TINY_CLIP
    bb = CLIPBackbone.from_config(**{**TINY_CLIP, **kw})
    return TokenBinder(bb, num_frames=num_frames, num_indicators=4, num_candidates=3, focus_heads=2,
                       num_samples=50)
