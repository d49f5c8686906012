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

``keep_pretrained_shifted_attention=True`` reproduces the model the authors *evaluated* for
UCoFiA: their UCoFiA loader does not remap the ``attn.net.*`` keys of the shifted layers
(10-11), so those layers keep the attention weights of the CLIP the model was built from
(OpenAI's), not the checkpoint's. The default loads the checkpoint's, as TS2-Net's loader does.

T-MASS (:func:`map_tmass_names`): ``clip.<Hugging Face CLIPModel name>`` -> ``clip.clip.<same
name>`` (our backbone *is* a ``transformers.CLIPModel``); ``pool_frames.*`` and
``stochastic.std_branch.linear_proj.*`` -> the same names. The authors' trainer saves
``{"epoch", "state_dict", "optimizer"}``: the ``state_dict`` entry is taken. Ignored: the unused
``stochastic.std_branch.learnable_scalar`` and the ``position_ids`` buffers older
``transformers`` saved. A T-MASS checkpoint given to another model, or another model's to
T-MASS, is refused with an error naming both (:func:`identify_model`).

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


def map_official_names(state_dict: dict, keep_pretrained_shifted_attention: bool = False
                       ) -> tuple[dict, list[str], list[str]]:
    """Authors' names -> ours. Returns ``(mapped, ignored, unrecognised_clip_keys)``; with
    ``keep_pretrained_shifted_attention`` the shifted layers' ``attn.net.*`` are ignored."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    mapped, ignored, clip_sd = {}, [], {}
    for k, v in sd.items():
        if (k in _CLIP_META or k.startswith(IGNORED_PREFIXES)
                or (keep_pretrained_shifted_attention and ".attn.net." in k)):
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


# Keys only one model family has (ours or the authors' names), to name the model a state dict
# was saved from when it is given to another. UCoFiA comes before TS2-Net: it has TS2-Net's too.
MODEL_SIGNATURES = (
    ("UCoFiA", ("global_mat_weight", "word_mat_weight", "pixel_mat_weight", "frame_logit_weight")),
    ("TS2-Net", ("visual_token_selector.", "transformerClip.", "frame_position_embeddings.")),
    ("T-MASS", ("pool_frames.", "stochastic.")),
    ("TokenBinder", ("query_indicators", "focused.")),
)


def identify_model(state_dict: dict) -> str | None:
    """The model family whose characteristic keys ``state_dict`` has (``"TS2-Net"``,
    ``"UCoFiA"``, ``"T-MASS"``, ``"TokenBinder"``), or ``None``; ``module.`` prefixes ignored."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    for name, prefixes in MODEL_SIGNATURES:
        if any(k.startswith(prefixes) for k in keys):
            return name
    return None


def load_official_checkpoint(model: nn.Module, state_dict: dict, strict: bool = False, *,
                             keep_pretrained_shifted_attention: bool = False) -> LoadReport:
    """Copy an authors' state dict into ``model`` (a TS2Net, UCoFiA or TMASS).

    Raises ``ValueError`` listing every shape mismatch (nothing is copied then); with
    ``strict=True`` also on missing or unexpected keys. Returns a :class:`LoadReport`.

    ``keep_pretrained_shifted_attention=True``: leave the shifted layers' attention as the
    backbone has it (the checkpoint's ``attn.net.*`` reported as ignored), which is the
    model the authors' released UCoFiA evaluation ran (their loader misses those keys).
    For comparison with their numbers only; the default loads the checkpoint's weights.

    A model without released weights (``official_checkpoint = False``: TokenBinder) raises
    ``ValueError`` naming the model the state dict belongs to, and so does a T-MASS state dict
    given to another model or another model's given to T-MASS (their names differ throughout).
    A training checkpoint ``{"state_dict": ..., ...}`` (T-MASS's trainer saves those) is
    unwrapped."""
    if not getattr(model, "official_checkpoint", True):
        found = identify_model(state_dict)
        raise ValueError(f"{type(model).__name__} has no official checkpoint"
                         + (f" and this state dict is a {found}'s" if found else "")
                         + "; load weights saved from this implementation with model.load_state_dict")
    own = model.state_dict()
    tmass = identify_model(own) == "T-MASS"
    if isinstance(state_dict.get("state_dict"), dict):      # a training checkpoint (T-MASS's trainer)
        state_dict = state_dict["state_dict"]
    found = identify_model(state_dict)
    if found and (found == "T-MASS") != tmass:
        example = next(k for k in state_dict if k.removeprefix("module.").startswith(dict(MODEL_SIGNATURES)[found]))
        raise ValueError(f"this is a {found} checkpoint (it has {example!r}) but the model is a "
                         f"{type(model).__name__}: load it into a {found} model")
    if tmass:
        mapped, ignored, unexpected = map_tmass_names(state_dict)
    else:
        mapped, ignored, unexpected = map_official_names(state_dict, keep_pretrained_shifted_attention)
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
