"""Load the authors' released TS2-Net / UCoFiA / T-MASS state dicts (SPEC "Official checkpoint names").

Name mapping, authors -> ours:

* ``clip.<OpenAI CLIP name>`` -> ``clip.clip.<transformers name>`` through
  :func:`tvr_models.clip.convert_openai_state_dict` (q/k/v split, transposed projections;
  the shifted layers' ``attn.net.*`` are the plain attention weights);
* ``frame_position_embeddings.weight``, ``transformerClip.resblocks.{i}.*``,
  ``visual_token_selector.score_predictor.{in_conv,out_conv}.*`` and UCoFiA's
  ``*_mat_weight*`` / ``frame_logit_weight`` -> the same names (our modules use the authors'
  names for exactly this reason);
* a leading ``module.`` (DistributedDataParallel) is stripped.

T-MASS (:func:`map_tmass_names`): ``clip.<Hugging Face CLIPModel name>`` -> ``clip.clip.<same
name>`` (our backbone *is* a ``transformers.CLIPModel``); ``pool_frames.*`` and
``stochastic.std_branch.linear_proj.*`` -> the same names. The authors' trainer saves
``{"epoch", "state_dict", "optimizer"}``: the ``state_dict`` entry is taken. Ignored: the unused
``stochastic.std_branch.learnable_scalar`` and the ``position_ids`` buffers older
``transformers`` saved.

A checkpoint of one family (TS2-Net/UCoFiA: ``transformerClip.*``, ``visual_token_selector.*``;
T-MASS: ``pool_frames.*``, ``stochastic.*``) given to a model of the other is refused with an
error naming both.

Keys the authors' models carry but never use in the forward we implement (TS2-Net's
``text_token_selector``/``visual_prompt_encoder``, UCoFiA's ``word_logit_weight``,
``frame_mat_weight(2)``, ``word_mat_weight_for_pixel``, CLIP's ``input_resolution``...) are
reported as *ignored*; anything else unknown is *unexpected*. Any shape mismatch is refused
before a single tensor is copied.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .clip import convert_openai_state_dict

IGNORED_PREFIXES = ("text_token_selector.", "visual_prompt_encoder.", "word_logit_weight",
                    "frame_mat_weight", "word_mat_weight_for_pixel", "similarity_dense.", "cross.",
                    "lstm_visual.")
_CLIP_META = ("clip.input_resolution", "clip.context_length", "clip.vocab_size")


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_official_checkpoint` did (names are in *our* naming for ``missing``,
    the checkpoint's for ``unexpected`` and ``ignored``)."""
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: list[str]

    def summary(self) -> str:
        s = f"loaded {len(self.loaded)} tensors"
        for name in ("missing", "unexpected", "ignored"):
            keys = getattr(self, name)
            if keys:
                s += f"; {name} {len(keys)}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        return s


def map_official_names(state_dict: dict) -> tuple[dict, list[str], list[str]]:
    """Authors' names -> ours. Returns ``(mapped, ignored, unrecognised_clip_keys)``."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    mapped, ignored, clip_sd = {}, [], {}
    for k, v in sd.items():
        if k in _CLIP_META or k.startswith(IGNORED_PREFIXES):
            ignored.append(k)
        elif k.startswith("clip."):
            clip_sd[k[len("clip."):]] = v
        else:
            mapped[k] = v
    bad_clip = []
    if clip_sd:
        try:
            converted = convert_openai_state_dict(clip_sd)
        except KeyError:
            # keep what converts; report the rest as unexpected
            good = {}
            for k, v in clip_sd.items():
                try:
                    good.update(convert_openai_state_dict({k: v}))
                except KeyError:
                    bad_clip.append("clip." + k)
            converted = good
        mapped.update({"clip.clip." + k: v for k, v in converted.items()})
    return mapped, ignored, bad_clip


_TMASS_IGNORED = ("stochastic.std_branch.learnable_scalar", "clip.text_model.embeddings.position_ids",
                  "clip.vision_model.embeddings.position_ids")
_FAMILIES = {"T-MASS": ("pool_frames.", "stochastic."),
             "TS2-Net/UCoFiA": ("transformerClip.", "visual_token_selector.", "frame_position_embeddings.")}


def map_tmass_names(state_dict: dict) -> tuple[dict, list[str], list[str]]:
    """T-MASS names -> ours. Returns ``(mapped, ignored, [])`` (nothing is unrecognised at this
    stage: keys our model lacks are reported as unexpected by the loader)."""
    mapped, ignored = {}, []
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k in _TMASS_IGNORED:
            ignored.append(k)
        elif k.startswith("clip."):
            mapped["clip." + k] = v
        else:
            mapped[k] = v
    return mapped, ignored, []


def _family(keys) -> tuple[str | None, str | None]:
    """(model family, a key that shows it) of a list of state-dict keys."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    for name, prefixes in _FAMILIES.items():
        hits = [k for k in keys if k.startswith(prefixes)]
        if hits:
            return name, hits[0]
    return None, None


def load_official_checkpoint(model: nn.Module, state_dict: dict, strict: bool = False) -> LoadReport:
    """Copy an authors' state dict into ``model`` (a TS2Net, UCoFiA or TMASS).

    ``state_dict`` may also be the authors' training checkpoint ``{"state_dict": ..., ...}``.
    Raises ``ValueError`` when the checkpoint belongs to another model family, listing every
    shape mismatch (nothing is copied then), and with ``strict=True`` on missing or unexpected
    keys. Returns a :class:`LoadReport`."""
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    ckpt_family, example = _family(state_dict)
    model_family, _ = _family(model.state_dict())
    if ckpt_family and model_family and ckpt_family != model_family:
        raise ValueError(f"this is a {ckpt_family} checkpoint (it has {example!r}) but the model is a "
                         f"{type(model).__name__} ({model_family}): load it into a {ckpt_family} model")
    tmass = model_family == "T-MASS"
    mapped, ignored, unexpected = (map_tmass_names if tmass else map_official_names)(state_dict)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in mapped.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError("checkpoint does not fit the model (shape mismatch):\n  " + "\n  ".join(mismatched))
    unexpected += [k for k in mapped if k not in own]
    missing = [k for k in own if k not in mapped]
    if strict and (missing or unexpected):
        raise ValueError(f"strict load: missing {missing}, unexpected {unexpected}")
    loaded = [k for k in mapped if k in own]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(mapped[k])
    return LoadReport(loaded, missing, unexpected, ignored)
