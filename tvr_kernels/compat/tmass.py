"""T-MASS's evaluation step on ``tk.stochastic_max_similarity``, from the tensors the authors'
trainer holds.

In T-MASS (``Jiamian-Wang/T-MASS-text-video-retrieval``, on X-Pool), ``Trainer._valid_epoch_step``
of ``trainer/trainer_stochastic.py`` holds, once every batch is encoded:

* ``text_embeds`` ``[Nt, D]``, ``vid_embeds`` ``[Nv, T, D]`` (one entry per video id, in
  first-occurrence order), ``all_vid_ids`` (the video id of each text);
* ``vid_embeds_pooled = model.pool_frames(text_embeds, vid_embeds)`` ``[Nv, Nt, D]``;
* ``model.stochastic`` (its radius ``std_branch.linear_proj``, a ``Linear(T, D)``).

It then loops over videos drawing ``config.stochasic_trials`` stochastic texts per text,
keeps the best per pair (``text_embeds_stochastic_allpairs``, ``[Nv, Nt, D]``), regroups
texts and poolings per video id (``generate_embeds_per_video_id_stochastic``) and scores
them (``sim_matrix_inference_stochastic`` of ``modules/metrics.py``). The functions below
replace that whole block; nothing of size ``Nt*Nv*M*D`` or ``Nv*Nv*K*D`` is formed.

Two definitions, named as such:

* :func:`tmass_similarity_query_conditioned`: the intended score, ``max_m cos(t_m,
  vid_embeds_pooled[j, i])`` (the selection the authors make);
* :func:`tmass_similarity_leaky`: the authors' final score, which compares the selected
  text with video ``j`` pooled for *its own* caption in the query's slot, not for the query.
  It leaks the ground truth (T-MASS issue #7; SPEC 5): for comparison with published
  numbers only, never to report retrieval results.

:func:`per_video_id` lays either out as the authors' ``sims`` ``[Nv, K, Nv]`` for their
``t2v_metrics`` / ``v2t_metrics``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import _philox, _validate
from ..ops.stochastic_max_similarity import stochastic_max_similarity, stochastic_text_embedding
from ..reference.stochastic_max_similarity import PRIORS, _cos_rows

# The authors' config.stochastic_prior values -> the op's prior names.
AUTHORS_PRIORS = {"uniform01": "uniform", "normal": "normal"}

# Pairs whose selected text is recomputed at once by the leaky score (bounds its memory).
_PAIR_BLOCK = 1 << 16


def _chain(stochastic) -> list:
    """``stochastic`` and the modules below it on the way to the radius ``Linear``."""
    chain = [stochastic]
    for name in ("stochastic", "std_branch", "linear_proj"):
        below = getattr(chain[-1], name, None)
        if below is not None:
            chain.append(below)
    return chain


def radius_parameters(stochastic) -> tuple[Tensor, Tensor]:
    """``(weight [D, T], bias [D])`` of the radius ``Linear(T, D)``, from the authors'
    ``model``, ``model.stochastic`` (``StochasticText``), its ``std_branch``
    (``LinearCosRadius``), the ``nn.Linear`` itself, or a ``(weight, bias)`` pair."""
    if isinstance(stochastic, (tuple, list)):
        if len(stochastic) != 2:
            raise ValueError(f"stochastic as a sequence must be (weight [D, T], bias [D]), got "
                             f"{len(stochastic)} items")
        return stochastic[0], stochastic[1]
    lin = _chain(stochastic)[-1]
    if not isinstance(lin, nn.Linear):
        raise TypeError("stochastic must be the authors' model.stochastic (or the model, its "
                        "std_branch, the radius nn.Linear, or a (weight, bias) pair), got "
                        f"{type(stochastic).__name__}")
    bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
    return lin.weight, bias


def _prior(stochastic, prior: str | None, std: float | None) -> tuple[str, float]:
    """The prior: given, else the authors' ``config.stochastic_prior`` (and
    ``stochastic_prior_std``) of the first module on the chain that has a config, else their
    default ``U[0, 1)``."""
    config = next((m.config for m in _chain(stochastic) if hasattr(m, "config")), None)
    if prior is None:
        authors = getattr(config, "stochastic_prior", "uniform01")
        if authors not in AUTHORS_PRIORS:
            raise ValueError(f"config.stochastic_prior = {authors!r} is not one of the authors' "
                             f"priors {tuple(AUTHORS_PRIORS)}")
        prior = AUTHORS_PRIORS[authors]
    _validate.choice("prior", prior, PRIORS)
    if std is None:
        std = float(getattr(config, "stochastic_prior_std", 1.0)) if prior == "normal" else 1.0
    return prior, std


def _check_embeds(text_embeds, vid_embeds, vid_embeds_pooled) -> None:
    _validate.tensor("text_embeds", text_embeds, ndim=2, shape_doc="[Nt, D]")
    _validate.tensor("vid_embeds", vid_embeds, ndim=3, shape_doc="[Nv, T, D] (frame embeddings)")
    _validate.tensor("vid_embeds_pooled", vid_embeds_pooled, ndim=3,
                     shape_doc="[Nv, Nt, D] (model.pool_frames(text_embeds, vid_embeds))")
    (nt, d), nv = text_embeds.shape, vid_embeds.shape[0]
    if vid_embeds.shape[2] != d:
        raise ValueError(f"vid_embeds is [Nv, T, D] = {tuple(vid_embeds.shape)} but text_embeds "
                         f"is [Nt, D] = {tuple(text_embeds.shape)}: D must agree")
    if tuple(vid_embeds_pooled.shape) != (nv, nt, d):
        raise ValueError(f"vid_embeds_pooled must be [Nv, Nt, D] = {(nv, nt, d)} (video j pooled "
                         f"for text i at [j, i]), got {tuple(vid_embeds_pooled.shape)}")


def _inputs(text_embeds, vid_embeds, vid_embeds_pooled, stochastic, prior, std) -> dict:
    """Checked arguments of the op: radius on the embeddings' device and dtype (the authors
    move ``model.stochastic`` to the CPU for this step; here it may stay where it is)."""
    _check_embeds(text_embeds, vid_embeds, vid_embeds_pooled)
    weight, bias = radius_parameters(stochastic)
    prior, std = _prior(stochastic, prior, std)
    return dict(radius_weight=weight.to(text_embeds), radius_bias=bias.to(text_embeds),
                prior=prior, std=std)


def tmass_similarity_query_conditioned(text_embeds: Tensor, vid_embeds: Tensor,
                                       vid_embeds_pooled: Tensor, stochastic,
                                       num_trials: int = 20, *, prior: str | None = None,
                                       std: float | None = None, seed: int | None = None,
                                       noise: Tensor | None = None) -> Tensor:
    """T-MASS's evaluation similarity, intended definition: ``sims[i, j] = max_m cos(t_m,
    vid_embeds_pooled[j, i])`` with ``t_m = text_i + eps_m * R_ij`` the ``num_trials``
    stochastic texts of the pair and ``R_ij`` the radius of text ``i`` and video ``j``'s
    frames.

    Replaces, in ``Trainer._valid_epoch_step`` (``trainer/trainer_stochastic.py``), the
    per-video selection loop, ``generate_embeds_per_video_id_stochastic`` and
    ``sim_matrix_inference_stochastic``; the authors' selection is this one, their final score
    is :func:`tmass_similarity_leaky`. Runs the fused ``tk.stochastic_max_similarity``: the
    samples are never materialised.

    Args:
        text_embeds: ``[Nt, D]``.
        vid_embeds: ``[Nv, T, D]`` frame embeddings, one row per video id.
        vid_embeds_pooled: ``[Nv, Nt, D]``, video ``j`` pooled for text ``i`` at ``[j, i]``.
        stochastic: the authors' ``model.stochastic`` (or ``model``, its ``std_branch``, the
            radius ``nn.Linear(T, D)``, or ``(weight [D, T], bias [D])``).
        num_trials: ``M``, the authors' ``config.stochasic_trials`` (20).
        prior, std: ``"uniform"`` (``U[0, 1)``) or ``"normal"`` (``N(0, std^2)``); default
            from the module's ``config.stochastic_prior`` / ``stochastic_prior_std`` when it
            has one, else uniform.
        seed: Philox seed of the samples; ``None`` draws one from torch's default generator
            (so ``torch.manual_seed`` makes the evaluation reproducible, as with the authors'
            ``torch.rand_like``; the values differ from theirs).
        noise: optional ``[Nt, Nv, M, D]`` prior samples used as is (tests; small inputs).

    Returns:
        ``[Nt, Nv]`` cosines (not times the logit scale, as the authors'), text-major;
        :func:`per_video_id` gives the authors' ``[Nv, K, Nv]`` layout. Differentiable.
    """
    kw = _inputs(text_embeds, vid_embeds, vid_embeds_pooled, stochastic, prior, std)
    sims, _ = stochastic_max_similarity(text_embeds, vid_embeds, vid_embeds_pooled,
                                        num_samples=num_trials, seed=seed, noise=noise, **kw)
    return sims


def tmass_similarity_leaky(text_embeds: Tensor, vid_embeds: Tensor, vid_embeds_pooled: Tensor,
                           stochastic, all_vid_ids: Sequence, num_trials: int = 20, *,
                           prior: str | None = None, std: float | None = None,
                           seed: int | None = None, noise: Tensor | None = None) -> Tensor:
    """T-MASS's evaluation similarity as the authors' code computes it, ground-truth leak
    included: for comparison with published numbers only.

    The stochastic text of pair ``(i, j)`` is selected as in
    :func:`tmass_similarity_query_conditioned` (best of ``num_trials`` against
    ``vid_embeds_pooled[j, i]``), but scored against ``vid_embeds_pooled[j, c]`` with ``c``
    the caption of video ``j`` in text ``i``'s slot (its place among its own video's
    captions, in text order): for one caption per video, video ``j``'s own caption. The true
    video is thus the only one scored against a pooling conditioned on the query, which
    inflates R@1 (T-MASS issue #7). This is what ``generate_embeds_per_video_id_stochastic``
    followed by ``sim_matrix_inference_stochastic`` computes (``modules/metrics.py``).

    Args: as :func:`tmass_similarity_query_conditioned`, plus ``all_vid_ids``: the video id
    of each text (``Nt`` hashable ids or a tensor), the ground truth the leak uses; its
    distinct ids, in first-occurrence order, are the rows of ``vid_embeds``.

    Returns:
        ``[Nt, Nv]`` cosines; ``-inf`` where video ``j`` has no caption in text ``i``'s slot
        (the authors' padding gives NaN there). Differentiable.
    """
    kw = _inputs(text_embeds, vid_embeds, vid_embeds_pooled, stochastic, prior, std)
    nt, nv = text_embeds.shape[0], vid_embeds.shape[0]
    t2v = video_index(all_vid_ids, nt, nv, text_embeds.device)
    slot, k = caption_slots(t2v, nv)
    own = torch.full((nv, k), -1, dtype=torch.long, device=t2v.device)
    own[t2v, slot] = torch.arange(nt, device=t2v.device)
    target = own[:, slot].t()                    # [Nt, Nv]: video j's caption in i's slot
    if noise is None and seed is None:
        seed = _philox.draw_seed()               # one seed: the selection is recomputed below
    _, best = stochastic_max_similarity(text_embeds, vid_embeds, vid_embeds_pooled,
                                        num_samples=num_trials, seed=seed, noise=noise, **kw)
    out = text_embeds.new_full((nt, nv), float("-inf"))
    ii, jj = (target >= 0).nonzero(as_tuple=True)
    w, b = kw.pop("radius_weight"), kw.pop("radius_bias")
    for p0 in range(0, len(ii), _PAIR_BLOCK):
        i, j = ii[p0:p0 + _PAIR_BLOCK], jj[p0:p0 + _PAIR_BLOCK]
        chosen = stochastic_text_embedding(text_embeds, vid_embeds, w, b, best,
                                           torch.stack([i, j], 1), seed=seed, noise=noise, **kw)
        out[i, j] = _cos_rows(chosen, vid_embeds_pooled[j, target[i, j]])
    return out


def video_index(all_vid_ids: Sequence, num_texts: int, num_videos: int, device=None) -> Tensor:
    """``[Nt]`` int64: the row of ``vid_embeds`` of each text's video, the authors' grouping
    (distinct ids of ``all_vid_ids`` in first-occurrence order)."""
    ids = all_vid_ids.tolist() if isinstance(all_vid_ids, torch.Tensor) else list(all_vid_ids)
    if len(ids) != num_texts:
        raise ValueError(f"all_vid_ids must name the video of each of the Nt = {num_texts} texts, "
                         f"got {len(ids)} ids")
    rows: dict = {}
    index = [rows.setdefault(v, len(rows)) for v in ids]
    if len(rows) != num_videos:
        raise ValueError(f"all_vid_ids names {len(rows)} distinct videos but vid_embeds holds "
                         f"Nv = {num_videos} (one row per distinct id, first-occurrence order)")
    return torch.tensor(index, dtype=torch.long, device=device)


def caption_slots(text_to_video: Tensor, num_videos: int) -> tuple[Tensor, int]:
    """``(slot [Nt], K)``: each text's place among its video's captions, in text order (the
    authors' grouping of captions per video), and the most captions of one video."""
    counts = torch.bincount(text_to_video, minlength=num_videos)
    order = torch.argsort(text_to_video, stable=True)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(text_to_video)
    slot[order] = torch.arange(len(text_to_video), device=slot.device) - first[text_to_video[order]]
    return slot, (int(counts.max()) if len(text_to_video) else 0)


def per_video_id(sims: Tensor, all_vid_ids: Sequence) -> Tensor:
    """``[Nt, Nv]`` similarities -> the authors' ``[Nv, K, Nv]`` layout (what
    ``sim_matrix_inference_stochastic`` returns): ``[g, s, j]`` scores the ``s``-th caption
    of video ``g`` against video ``j``; missing captions are ``-inf`` rows (theirs are NaN:
    their ``t2v_metrics`` skips both, their ``v2t_metrics`` turns NaN into ``-inf``)."""
    _validate.tensor("sims", sims, ndim=2, shape_doc="[Nt, Nv]")
    nt, nv = sims.shape
    t2v = video_index(all_vid_ids, nt, nv, sims.device)
    slot, k = caption_slots(t2v, nv)
    out = sims.new_full((nv, k, nv), float("-inf"))
    out[t2v, slot] = sims
    return out
