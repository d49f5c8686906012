"""UCoFiA (Wang et al., ICCV 2023) on the CLIP backbone (SPEC "Models").

Backbone and token selection as TS2-Net (token shift in layers 10-11, ``tk.perturbed_topk``
top-3 + CLS per frame = P = 48 tokens), with UCoFiA's released score MLP. Three scores:

* video-sentence: ``exp(ls) * (s Wg) (v Wg1)^T``; ``s`` the normalised sentence feature, ``v``
  the normalised masked mean of the per-frame-normalised output of a temporal transformer
  over the T frame (CLS) features (with position embeddings, residual);
* sentence-frame: ``exp(ls) * tk.isa(<s, f_t>, frame_logit_weight)`` over the T frames,
  ``f`` the normalised CLIP frame features (before the temporal transformer);
* patch-word: ``tk.bi_isa(words Wl, patches, ...)`` with the normalised word features of all
  L text positions (padding included, as the authors) and the P selected tokens (not
  normalised); **not** multiplied by the logit scale.

Training logits are the mean of the three. At evaluation each granularity's [Nt, Nv] matrix
gets the Sinkhorn column bias ``tk.sinkhorn_knopp(bank_scores)[1]`` computed from the scores
of a text bank (the authors: all training captions) against the test videos, then the three
are averaged. Without a bank the three are averaged unbiased.

Like the authors, the ISA scores see every frame slot (``tk.isa`` takes no mask): padded
frames of a short video take part in the sentence-frame and patch-word scores. The
video-sentence score and the score MLP's video sum use the frame mask.
``local_mat_weight1`` is kept only so that released checkpoints round-trip: the authors'
forward never uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops
from ._modules import (RetrievalModel, TemporalTransformer, UCoFiAScorePredictor,
                       VisualTokenSelection, masked_mean, scale)
from .clip import CLIPBackbone


class UCoFiA(RetrievalModel):
    """UCoFiA. Sizes as :class:`~tvr_models.ts2net.TS2Net` plus ``max_words`` L (the text
    length the word ISA weights are sized for). ``tau`` is the ISA temperature (0.01).
    ``topk_gradient``: the token selection's estimator, as in TS2-Net."""

    granularities = 3

    def __init__(self, backbone: CLIPBackbone, num_frames: int = 12, max_words: int = 32,
                 topk: int = 3, temporal_layers: int = 4, temporal_heads: int | None = None,
                 max_positions: int = 77, num_samples: int = 500, sigma: float = 0.05,
                 tau: float = 0.01, sinkhorn_iters: int = 4, topk_gradient: str = "diagonal"):
        super().__init__()
        d = backbone.embed_dim
        if num_frames > max_positions:
            raise ValueError(f"max_positions {max_positions} < num_frames {num_frames}")
        self.clip = backbone
        self.num_frames, self.max_words, self.topk = num_frames, max_words, topk
        self.tau, self.sinkhorn_iters = tau, sinkhorn_iters
        p = num_frames * (topk + 1)
        self.frame_position_embeddings = nn.Embedding(max_positions, d)
        self.transformerClip = TemporalTransformer(d, temporal_layers, temporal_heads or max(1, d // 64))
        self.visual_token_selector = VisualTokenSelection(UCoFiAScorePredictor(d), topk, num_samples, sigma,
                                                          topk_gradient)
        eye = lambda n: nn.Parameter(torch.eye(n))  # noqa: E731  (all start at the identity)
        self.global_mat_weight, self.global_mat_weight_1 = eye(d), eye(d)
        self.local_mat_weight, self.local_mat_weight1 = eye(d), eye(d)
        self.frame_logit_weight = eye(num_frames)
        self.word_mat_weight, self.word_mat_weight2 = eye(max_words), eye(max_words)
        self.pixel_mat_weight, self.pixel_mat_weight2 = eye(p), eye(p)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        """``{"sentence": [Bt, D], "words": [Bt, L, D]}``, both normalised."""
        if input_ids.shape[1] != self.max_words:
            raise ValueError(f"texts have {input_ids.shape[1]} tokens, the model expects {self.max_words}")
        sentence, words = self.clip.encode_text(input_ids)
        return {"sentence": F.normalize(sentence, dim=-1), "words": F.normalize(words, dim=-1)}

    def encode_video(self, video: Tensor, video_mask: Tensor) -> dict:
        """``{"video": [Bv, D], "frames": [Bv, T, D], "patches": [Bv, P, D]}``: normalised
        video-level and frame features, and the selected tokens (not normalised)."""
        b, t = video.shape[:2]
        if t != self.num_frames:
            raise ValueError(f"video has {t} frames, the model was built for {self.num_frames}")
        tokens = self.clip.encode_image(video.flatten(0, 1), num_frames=t)         # [B*T, N, D]
        patches = self.visual_token_selector(tokens, t, video_mask)                 # [B, P, D]
        frames = tokens[:, 0].reshape(b, t, -1)                                     # [B, T, D]
        pos = self.frame_position_embeddings.weight[:t]
        h = self.transformerClip(frames + pos, video_mask) + frames
        v = F.normalize(masked_mean(F.normalize(h, dim=-1), video_mask), dim=-1)
        return {"video": v, "frames": F.normalize(frames, dim=-1), "patches": patches}

    def score(self, text_feats: dict, video_feats: dict) -> Tensor:
        """[3, Bt, Bv]: video-sentence, sentence-frame, patch-word logits."""
        ls = scale(self.clip.logit_scale)
        s = text_feats["sentence"]
        vs = ls * (s @ self.global_mat_weight) @ (video_feats["video"] @ self.global_mat_weight_1).t()
        sf_sim = torch.einsum("td,vfd->tvf", s, video_feats["frames"])               # [Bt, Bv, T]
        sf = ls * _ops.op("isa")(sf_sim, self.frame_logit_weight, -1, self.tau)
        pw = _ops.op("bi_isa")(text_feats["words"] @ self.local_mat_weight, video_feats["patches"],
                               self.word_mat_weight, self.pixel_mat_weight,
                               self.word_mat_weight2, self.pixel_mat_weight2, self.tau)
        return torch.stack([vs, sf, pw])

    def column_bias(self, bank_sims: Tensor) -> Tensor:
        """Sinkhorn column bias [G, Nv] of each granularity's bank scores [G, Nb, Nv]."""
        return torch.stack([_ops.op("sinkhorn_knopp")(b, self.sinkhorn_iters)[1] for b in bank_sims])

    def finalize(self, sims: Tensor, bank_sims: Tensor | None = None,
                 column_bias: Tensor | None = None) -> Tensor:
        """Mean over granularities of ``sims[g] + column_bias[g]`` (no bias without a bank).
        ``column_bias`` [G, Nv]: precomputed (a sharded evaluation passes its columns'
        part), else :meth:`column_bias` of ``bank_sims``."""
        if column_bias is None and bank_sims is not None:
            column_bias = self.column_bias(bank_sims)
        if column_bias is None:
            return sims.mean(0)
        out = torch.zeros_like(sims[0])
        for g in range(sims.shape[0]):
            out += sims[g] + column_bias[g][None, :].to(sims.dtype)
        return out / sims.shape[0]


def tiny_ucofia(num_frames: int = 4, max_words: int = 32, **kw) -> UCoFiA:
    """A tiny random UCoFiA for tests and the demo."""
    from .ts2net import TINY_CLIP
    bb = CLIPBackbone.from_config(**{**TINY_CLIP, **kw})
    return UCoFiA(bb, num_frames=num_frames, max_words=max_words, topk=3, temporal_layers=1,
                  temporal_heads=2, max_positions=num_frames * 4, num_samples=50)
