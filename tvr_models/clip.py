"""CLIP backbone on ``transformers.CLIPModel`` with TS2-Net's token shift (SPEC 1).

Three ways to build one, never touching the network:

* ``CLIPBackbone.from_pretrained(dir)``: a local Hugging Face CLIP directory
  (``config.json`` + weights), loaded with ``local_files_only=True``;
* ``CLIPBackbone.from_openai_state_dict(sd)``: an OpenAI-format state dict (the ``.pt`` files of
  ``openai/CLIP``, or the ``clip.*`` part of a TS2-Net/UCoFiA checkpoint), converted by
  :func:`convert_openai_state_dict`;
* ``CLIPBackbone.from_config(...)``: random weights at any size (tests, the demo).

Token shift runs on the output of LayerNorm-1 of the chosen visual layers, just before the
attention's QKV projection; the residual stream is not shifted. It is inserted by swapping
that layer's ``layer_norm1`` for :class:`ShiftedLayerNorm`, a ``LayerNorm`` subclass, so the
parameter names (and therefore checkpoints) are unchanged.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from . import _ops

DEFAULT_SHIFT_LAYERS = (10, 11)


class ShiftedLayerNorm(nn.LayerNorm):
    """``LayerNorm`` followed by ``tk.token_shift`` over the frames of each video.

    ``num_frames`` is set by :meth:`CLIPBackbone.encode_image` for the duration of a call;
    while it is ``None`` (single images) the layer is a plain LayerNorm.
    Input/output: [B*T, N, C], rows ordered video-major, frame-minor.
    """

    def __init__(self, ln: nn.LayerNorm, fold_div: int = 7, offset: int = 3):
        super().__init__(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                         device=ln.weight.device, dtype=ln.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(ln.weight)
            self.bias.copy_(ln.bias)
        self.fold_div, self.offset = fold_div, offset
        self.num_frames: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.num_frames is None:
            return y
        return _ops.op("token_shift")(y, self.num_frames, self.fold_div, self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", token_shift(fold_div={self.fold_div}, offset={self.offset})"


class CLIPBackbone(nn.Module):
    """CLIP text and image towers returning *projected* features of every token.

    Attributes: ``clip`` (the ``CLIPModel``), ``shift_layers`` (visual layers with token shift),
    ``embed_dim`` (joint dim D), ``image_size``, ``context_length``.
    """

    def __init__(self, clip: CLIPModel, shift_layers: Iterable[int] = DEFAULT_SHIFT_LAYERS):
        super().__init__()
        self.clip = clip
        layers = clip.vision_model.encoder.layers
        self.shift_layers = tuple(sorted(set(int(i) for i in shift_layers)))
        for i in self.shift_layers:
            if not 0 <= i < len(layers):
                raise ValueError(f"shift layer {i} out of range: the vision tower has {len(layers)} layers")
            if not isinstance(layers[i].layer_norm1, ShiftedLayerNorm):
                layers[i].layer_norm1 = ShiftedLayerNorm(layers[i].layer_norm1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str, shift_layers=DEFAULT_SHIFT_LAYERS, **kwargs) -> "CLIPBackbone":
        """A local Hugging Face CLIP directory; never downloads (``local_files_only=True``)."""
        clip = CLIPModel.from_pretrained(path, local_files_only=True, **kwargs)
        return cls(clip.float(), shift_layers)

    @classmethod
    def from_openai_state_dict(cls, state_dict: dict, shift_layers=DEFAULT_SHIFT_LAYERS,
                               text_heads: int | None = None, vision_heads: int | None = None,
                               prefix: str = "") -> "CLIPBackbone":
        """An OpenAI-format CLIP state dict (keys ``visual.*``, ``transformer.*``, ...).

        ``prefix`` selects a sub-dict (e.g. ``"clip."`` inside a TS2-Net checkpoint). Heads
        default to ``width // 64`` as in OpenAI's ``build_model``."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        config = config_from_openai_state_dict(sd, text_heads, vision_heads)
        clip = CLIPModel(config)
        missing, unexpected = clip.load_state_dict(convert_openai_state_dict(sd), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"OpenAI CLIP conversion: missing {missing}, unexpected {unexpected}")
        return cls(clip.float(), shift_layers)

    @classmethod
    def from_config(cls, *, embed_dim=512, vocab_size=49408, context_length=77, text_width=512,
                    text_layers=12, text_heads=8, image_size=224, patch_size=32, vision_width=768,
                    vision_layers=12, vision_heads=12, shift_layers=DEFAULT_SHIFT_LAYERS,
                    attn_implementation="sdpa") -> "CLIPBackbone":
        """Random weights. Defaults are ViT-B/32; tests pass tiny sizes."""
        text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=text_width,
                              intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                              num_attention_heads=text_heads, max_position_embeddings=context_length,
                              hidden_act="quick_gelu", projection_dim=embed_dim,
                              eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, pad_token_id=0)
        vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                  image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu",
                                  projection_dim=embed_dim)
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                            projection_dim=embed_dim)
        config._attn_implementation = attn_implementation
        return cls(CLIPModel(config), shift_layers)

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return self.clip.config.projection_dim

    @property
    def image_size(self) -> int:
        return self.clip.config.vision_config.image_size

    @property
    def context_length(self) -> int:
        return self.clip.config.text_config.max_position_embeddings

    @property
    def num_patches(self) -> int:
        """Tokens per frame including CLS (50 for ViT-B/32 at 224)."""
        return (self.image_size // self.clip.config.vision_config.patch_size) ** 2 + 1

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    # ------------------------------------------------------------------ forward
    def encode_text(self, input_ids: Tensor, inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Text features.

        input_ids: [B, L] (SOT ... EOT, then padding). Only the causal mask is applied, as in
        OpenAI's ``encode_text`` (the authors pass no padding mask; the EOT feature does not
        depend on it, the padding tokens' features -- used by UCoFiA's word scores -- do).
        inputs_embeds: optional [B, L, W] token embeddings used in place of looking
        ``input_ids`` up (TokenBinder puts its learned query indicators there); position
        embeddings are added either way, and ``input_ids`` still locates EOT.
        Returns ``(sentence [B, D], words [B, L, D])``: EOT-pooled (argmax of the ids, the EOT
        token having the largest id) and every token, after ``ln_final`` and the projection.
        """
        tm = self.clip.text_model
        h = (tm.embeddings(input_ids=input_ids) if inputs_embeds is None
             else tm.embeddings(inputs_embeds=inputs_embeds))
        L = input_ids.shape[1]
        causal = torch.full((L, L), float("-inf"), device=h.device, dtype=h.dtype).triu_(1)
        h = tm.encoder(inputs_embeds=h, attention_mask=causal[None, None]).last_hidden_state
        words = self.clip.text_projection(tm.final_layer_norm(h))
        eot = input_ids.argmax(dim=-1)
        sentence = words[torch.arange(words.shape[0], device=words.device), eot]
        return sentence, words

    def encode_image(self, pixels: Tensor, num_frames: int | None = None) -> Tensor:
        """Projected features of every visual token.

        pixels: [B*T, 3, H, W] (video-major, frame-minor when ``num_frames`` is given; token
        shift runs only then). Returns [B*T, N, D] (N = 1 + patches; index 0 is CLS), each
        token through ``ln_post`` and the projection, as TS2-Net's ``encode_image`` does.
        """
        vm = self.clip.vision_model
        shifted = [vm.encoder.layers[i].layer_norm1 for i in self.shift_layers]
        for ln in shifted:
            ln.num_frames = num_frames
        try:
            h = vm.pre_layrnorm(vm.embeddings(pixels))
            h = vm.encoder(inputs_embeds=h).last_hidden_state
        finally:
            for ln in shifted:
                ln.num_frames = None
        return self.clip.visual_projection(vm.post_layernorm(h))


# ---------------------------------------------------------------------- OpenAI format
def config_from_openai_state_dict(sd: dict, text_heads: int | None = None,
                                  vision_heads: int | None = None) -> CLIPConfig:
    """Infer a ``CLIPConfig`` from an OpenAI ViT CLIP state dict (as OpenAI's ``build_model``)."""
    if "visual.proj" not in sd:
        raise ValueError("not an OpenAI ViT CLIP state dict (no 'visual.proj'; ResNet CLIPs are unsupported)")
    vision_width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    embed_dim = sd["text_projection"].shape[1]
    context_length, text_width = sd["positional_embedding"].shape
    vocab = sd["token_embedding.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=text_width, intermediate_size=4 * text_width,
                          num_hidden_layers=text_layers,
                          num_attention_heads=text_heads or max(1, text_width // 64),
                          max_position_embeddings=context_length, hidden_act="quick_gelu",
                          projection_dim=embed_dim, eos_token_id=vocab - 1, bos_token_id=vocab - 2,
                          pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers,
                              num_attention_heads=vision_heads or max(1, vision_width // 64),
                              image_size=patch * grid, patch_size=patch, hidden_act="quick_gelu",
                              projection_dim=embed_dim)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=embed_dim)


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
          "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_IGNORED = {"input_resolution", "context_length", "vocab_size"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def convert_openai_state_dict(sd: dict) -> dict:
    """OpenAI CLIP names -> ``transformers.CLIPModel`` names.

    ``attn.in_proj_{weight,bias}`` is split into ``q/k/v_proj`` (rows [q; k; v]);
    ``text_projection`` and ``visual.proj`` ([W, D], used as ``x @ P``) become the transposed
    ``nn.Linear`` weights; ``attn.net.*`` (TS2-Net's shift wrapper around the attention of
    layers 10-11) maps like ``attn.*``. Unknown keys raise ``KeyError`` naming them.
    """
    out, unknown = {}, []
    for k, v in sd.items():
        if k in _IGNORED:
            continue
        if k in _TOP:
            out[_TOP[k]] = v
            continue
        if k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
            continue
        if k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
            continue
        m = _RESBLOCK.match(k)
        if m is None:
            unknown.append(k)
            continue
        tower = "vision_model" if m.group(1) else "text_model"
        base = f"{tower}.encoder.layers.{m.group(2)}."
        rest = m.group(3).replace("attn.net.", "attn.")
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]                      # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
            continue
        mod, _, leaf = rest.rpartition(".")
        if mod not in _BLOCK:
            unknown.append(k)
            continue
        out[f"{base}{_BLOCK[mod]}.{leaf}"] = v
    if unknown:
        raise KeyError(f"unrecognised OpenAI CLIP keys: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out
