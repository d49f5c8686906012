"""TS2-Net (Liu et al., ECCV 2022) on the CLIP backbone (SPEC "Models").

Pipeline for a video batch [B, T, 3, H, W]:

1. CLIP image tower with token shift (``tk.token_shift``) in visual layers 10-11; every token
   projected: [B*T, N, D].
2. Token selection: the score MLP, ``tk.perturbed_topk`` top-3 over the N-1 patch tokens, CLS
   always kept: [B, T*4, D] (48 tokens for T = 12).
3. Temporal transformer (4 layers, width D, 8 heads) over those tokens with learned position
   embeddings, residual; the T CLS slots are kept: frames [B, T, D].
4. Score ``exp(logit_scale) * sum_f a_f s_f`` with ``s_f = cos(text, frame_f)`` and
   ``a = softmax(4 s / ||s||)`` over the valid frames.

**Frame mask (difference from the authors).** The transformer works on T*(k+1) tokens, so
the per-frame mask must be expanded to tokens. The authors tile it (``mask.repeat(1, 1, 4)``:
``m_0..m_{T-1}, m_0..m_{T-1}, ...``), which for a short video masks the wrong tokens; we
interleave it (``repeat_interleave``: each frame's mask repeated for its k+1 tokens). For
videos with every frame valid (all of MSR-VTT at T=12) the two agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._modules import (RetrievalModel, ScorePredictor, TemporalTransformer, VisualTokenSelection,
                       scale)
from .clip import CLIPBackbone


class TS2Net(RetrievalModel):
    """TS2-Net. ``backbone``: a :class:`CLIPBackbone` (token shift layers chosen there).

    Sizes: ``num_frames`` T, ``topk`` k, ``temporal_layers``/``temporal_heads`` of the
    temporal transformer (width = the backbone's joint dim D), ``max_positions`` rows of
    ``frame_position_embeddings`` (77 in the authors' checkpoints; needs >= T*(k+1)).
    ``topk_gradient``: the token selection's gradient estimator, ``"diagonal"`` (the authors',
    default, so checkpoints train as published) or ``"full"`` (see ``tk.perturbed_topk``)."""

    granularities = 1

    def __init__(self, backbone: CLIPBackbone, num_frames: int = 12, topk: int = 3,
                 temporal_layers: int = 4, temporal_heads: int | None = None,
                 max_positions: int = 77, num_samples: int = 500, sigma: float = 0.05,
                 topk_gradient: str = "diagonal"):
        super().__init__()
        d = backbone.embed_dim
        if num_frames * (topk + 1) > max_positions:
            raise ValueError(f"max_positions {max_positions} < T*(k+1) = {num_frames * (topk + 1)}")
        if topk > backbone.num_patches - 1:
            raise ValueError(f"topk {topk} > patch tokens per frame {backbone.num_patches - 1}")
        self.clip = backbone
        self.num_frames, self.topk = num_frames, topk
        self.frame_position_embeddings = nn.Embedding(max_positions, d)
        self.transformerClip = TemporalTransformer(d, temporal_layers, temporal_heads or max(1, d // 64))
        self.visual_token_selector = VisualTokenSelection(ScorePredictor(d), topk, num_samples, sigma,
                                                          topk_gradient)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
        """``{"sentence": [Bt, D]}`` (EOT feature, not normalised)."""
        sentence, _ = self.clip.encode_text(input_ids)
        return {"sentence": sentence}

    def encode_video(self, video: Tensor, video_mask: Tensor) -> dict:
        """``{"frames": [Bv, T, D], "mask": [Bv, T]}``: the CLS slots after the temporal
        transformer (not normalised)."""
        b, t = video.shape[:2]
        if t != self.num_frames:
            raise ValueError(f"video has {t} frames, the model was built for {self.num_frames}")
        tokens = self.clip.encode_image(video.flatten(0, 1), num_frames=t)         # [B*T, N, D]
        sel = self.visual_token_selector(tokens, t, video_mask)                     # [B, T*(k+1), D]
        per = self.topk + 1
        token_mask = video_mask.repeat_interleave(per, dim=1)                       # interleaved
        pos = self.frame_position_embeddings.weight[: sel.shape[1]]
        x = self.transformerClip(sel + pos, token_mask) + sel
        return {"frames": x[:, ::per], "mask": video_mask}

    def score(self, text_feats: dict, video_feats: dict) -> Tensor:
        """[1, Bt, Bv] frame-weighted logits.

        A video with no valid frame (an all-zero mask) scores 0 against every text: its
        masked similarities are all 0, and the weights over them are uniform, as in the
        authors' head (a plain 0/0 and a softmax over nothing would give NaN)."""
        t = F.normalize(text_feats["sentence"], dim=-1)
        f = F.normalize(video_feats["frames"], dim=-1)
        valid = video_feats["mask"].bool()                                          # [Bv, T]
        s = torch.einsum("td,vfd->tvf", t, f) * valid                               # [Bt, Bv, T]
        w = s / s.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        logits = (4 * w).masked_fill(~valid, float("-inf"))
        logits = torch.where(valid.any(-1)[None, :, None], logits, torch.zeros_like(logits))
        w = torch.softmax(logits, dim=-1)
        return (scale(self.clip.logit_scale) * (w * s).sum(-1))[None]


def tiny_ts2net(num_frames: int = 4, **kw) -> TS2Net:
    """A tiny random TS2-Net for tests and the demo (joint dim 32, 2+2 layers, 32 px frames)."""
    bb = CLIPBackbone.from_config(**{**TINY_CLIP, **kw})
    return TS2Net(bb, num_frames=num_frames, topk=3, temporal_layers=1, temporal_heads=2,
                  max_positions=num_frames * 4, num_samples=50)


TINY_CLIP = dict(embed_dim=32, vocab_size=49408, context_length=32, text_width=32, text_layers=2,
                 text_heads=2, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                 vision_heads=2, shift_layers=(0, 1))
