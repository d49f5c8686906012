"""Sharded evaluation: the gallery split over the ranks of ``torch.distributed``.

Each rank holds a contiguous shard of the video gallery and computes its columns of the
similarity matrix; the texts (and UCoFiA's text bank) are encoded in shards too and
all-gathered, since every rank scores every text. The result is **identical to one process**:

* shards are whole encoding batches (``text_batch`` texts; for the gallery, whole units of
  ``lcm(video_batch, chunk_size)`` videos: :func:`gallery_shard`), so every batch an encoder
  sees and every block scored is the one of one process (same rows, same shapes, hence the
  same numbers to the last bit; matrix products of other shapes may round differently, and
  the token selection's noise is keyed by the position in the batch);
* each scoring block is passed its *global* offset, so T-MASS's per-pair noise and pooling
  tiles are those of one process (:func:`tvr_models.evaluate.score_matrix`);
* UCoFiA's Sinkhorn column bias needs the whole bank-by-gallery matrix: the bank's scores
  against each shard are gathered on rank 0, which computes the bias [G, Nv] and broadcasts
  it; each rank adds its columns' part;
* TokenBinder's stage 2 picks each text's top-K candidates over the whole gallery (each rank's
  top-K merged), their frames are summed from the ranks that hold them (one all-reduce per
  text chunk), and each rank adds the deltas that fall in its columns.

Then either the matrix is assembled on rank 0 (``topk=None``; memory ``Nt x Nv`` there), or,
for galleries too large for that, nothing pair-sized leaves a rank: each text's top-k videos
are merged on rank 0, and the metrics are computed from the shards exactly (a text's rank
counts the videos above its ground truth on every rank; a video's captions are ranked on
the rank that holds it).

The model's seeds must agree on every rank (checked): T-MASS's sampling seed, the token
selection's seed (a ``None`` selection seed draws per batch, differently on every rank as it
does batch to batch in one process).
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from . import distributed as D
from . import metrics as M
from .evaluate import _batched, _device, score_matrix


def batch_shard(n: int, batch: int) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of ``n`` items split into whole batches of ``batch``."""
    a, b = D.shard_range(-(-n // batch))
    return min(n, a * batch), min(n, b * batch)


def gallery_unit(video_batch: int, chunk_size: int) -> int:
    """Videos per indivisible unit of a gallery shard: whole encoding batches and whole
    scoring blocks."""
    return math.lcm(video_batch, chunk_size)


def gallery_shard(n: int, video_batch: int = 16, chunk_size: int = 128) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of a gallery of ``n`` videos (:func:`gallery_unit`)."""
    return batch_shard(n, gallery_unit(video_batch, chunk_size))


def _encode_shard(encode, inputs: tuple[Tensor, Tensor], start: int, stop: int, batch: int,
                  desc: str, progress: bool) -> dict:
    """Features of rows ``[start, stop)``; an empty shard returns 0-row features of the right
    shapes (from one dummy row) so that the gathers see the same keys on every rank."""
    if stop > start:
        return _batched(encode, tuple(x[start:stop] for x in inputs), batch, desc, progress)
    dummy = tuple(torch.ones(1, *x.shape[1:], dtype=x.dtype, device=_device(encode) or x.device)
                  for x in inputs)
    return {k: v[:0] for k, v in encode(*dummy).items()}


@torch.no_grad()
def encode_texts_sharded(model, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 256,
                         progress: bool = False) -> dict:
    """Features of every text (on every rank), each rank encoding its batches."""
    a, b = batch_shard(len(input_ids), batch_size)
    local = _encode_shard(model.encode_text, (input_ids, attention_mask), a, b, batch_size, "texts", progress)
    return D.all_gather_features(local)


def _check_seeds(model) -> None:
    sel = getattr(model, "visual_token_selector", model)
    seeds = (getattr(model, "seed", None), getattr(sel, "seed", None))
    every = D.all_gather_object(seeds)
    if any(s != every[0] for s in every):
        raise ValueError(f"the model's seeds differ between ranks ({every}): set the same seed on "
                         f"every rank (model.set_selection(seed=...))")


def global_candidates(rows: Tensor, k: int, video_offset: int) -> Tensor:
    """Each row's top-``k`` columns over the whole gallery (global indices [c, k], ascending:
    :meth:`TokenBinder.select_candidates` order) from this rank's columns ``rows`` [c, Nv_r]
    that start at ``video_offset``. Every rank gets the same indices."""
    kr = min(k, rows.shape[1])
    vals, idx = torch.topk(rows, kr, dim=-1)
    vals = D.all_gather(vals.t().contiguous()).t()                       # [c, sum kr]
    idx = D.all_gather((idx + video_offset).t().contiguous()).t()
    best = torch.topk(vals, k, dim=-1).indices
    return idx.gather(1, best).sort(dim=-1).values


def take_rows(feats: Tensor, idx: Tensor, video_offset: int) -> Tensor:
    """``feats_global[idx]`` for global indices ``idx`` (any shape) when each rank holds rows
    ``[video_offset, video_offset + len(feats))``: each rank fills its own, one all-reduce
    sums them (exact: the others add zeros)."""
    local = (idx >= video_offset) & (idx < video_offset + feats.shape[0])
    out = feats.new_zeros(*idx.shape, *feats.shape[1:])
    out[local] = feats[idx[local] - video_offset]
    return D.all_reduce_sum(out)


def add_at_columns(rows: Tensor, idx: Tensor, values: Tensor, video_offset: int) -> None:
    """``rows_global.scatter_add_(1, idx, values)`` restricted to this rank's columns ``rows``
    [c, Nv_r] (global ``[video_offset, video_offset + Nv_r)``), in place."""
    if rows.shape[1] == 0:
        return
    local = (idx >= video_offset) & (idx < video_offset + rows.shape[1])
    cols = torch.where(local, idx - video_offset, 0)
    rows.scatter_add_(1, cols, torch.where(local, values, torch.zeros_like(values)))


@torch.no_grad()
def score_shard(model, text_feats: dict, video_feats: dict, video_offset: int,
                bank_feats: dict | None = None, chunk_size: int = 128, progress: bool = False) -> Tensor:
    """Final similarity of every text with this rank's videos: [Nt, Nv_r], the columns
    ``[video_offset, video_offset + Nv_r)`` of what :func:`tvr_models.evaluate.score_features`
    gives in one process (bias and reranking over the whole gallery included)."""
    if getattr(model, "legacy_leaky_scoring", False):
        raise ValueError("legacy_leaky_scoring needs the whole gallery and the ground truth in one "
                         "process: it is not supported by the sharded evaluation")
    _check_seeds(model)
    text_feats, video_feats = model.prepare_scoring(text_feats, video_feats)
    sims = score_matrix(model, text_feats, video_feats, chunk_size, progress, video_offset)
    column_bias = None
    if bank_feats is not None and hasattr(model, "column_bias"):
        bank = score_matrix(model, bank_feats, video_feats, chunk_size, progress, video_offset)
        full = D.gather_to_main(bank, dim=2)                              # [G, Nb, Nv] on rank 0
        # in the bank's dtype (finalize casts it to that of the scores anyway), as the others expect
        bias = model.column_bias(full).to(bank.dtype) if D.is_main() else None
        nv = int(D.all_reduce_sum(torch.tensor([bank.shape[2]], device=bank.device)).item())
        bias = D.broadcast_from_main(bias, (bank.shape[0], nv), bank.dtype, bank.device)
        column_bias = bias[:, video_offset:video_offset + bank.shape[2]]
    sim = model.finalize(sims, column_bias=column_bias) if column_bias is not None else model.finalize(sims, None)
    rerank = getattr(model, "rerank", None)
    if rerank is None:
        return sim
    return rerank(sim, text_feats, video_feats, chunk_size, progress, video_offset=video_offset)


def shard_metrics(sim: Tensor, text_to_video: Tensor | None, video_offset: int, num_videos: int) -> dict:
    """:func:`tvr_models.metrics.retrieval_metrics` of the whole matrix from this rank's
    columns ``sim`` [Nt, Nv_r] (every rank calls it; every rank gets the result)."""
    nt, nvr = sim.shape
    if D.any_rank(bool(torch.isnan(sim).any()), sim.device):     # every rank raises, none waits
        raise ValueError("sim contains NaN: the similarity matrix is broken (refusing to rank)")
    t2v = torch.arange(nt) if text_to_video is None else torch.as_tensor(text_to_video).long()
    t2v = t2v.to(sim.device)
    mine = (t2v >= video_offset) & (t2v < video_offset + nvr)
    rows = mine.nonzero().flatten()
    gt = sim.new_zeros(nt)
    gt[rows] = sim[rows, t2v[rows] - video_offset]
    gt = D.all_reduce_sum(gt)                                             # each text's own score
    t2v_ranks = 1 + D.all_reduce_sum((sim > gt[:, None]).sum(1))
    best = M.best_caption_ranks(sim, rows, t2v[rows] - video_offset)      # [Nv_r]
    v2t_ranks = torch.cat(D.all_gather_object(best.cpu()))
    if len(v2t_ranks) != num_videos or (v2t_ranks == torch.iinfo(torch.long).max).any():
        raise ValueError("videos without any caption in the sharded evaluation")
    return {"t2v": M.summarize(t2v_ranks.cpu()), "v2t": M.summarize(v2t_ranks)}


def gather_topk(sim: Tensor, k: int, video_offset: int) -> tuple[Tensor, Tensor] | None:
    """Each text's ``k`` best videos over the whole gallery, ``(scores [Nt, k], global video
    indices [Nt, k])`` on rank 0 (None elsewhere), from each rank's columns ``sim``."""
    kr = min(k, sim.shape[1])
    vals, idx = torch.topk(sim, kr, dim=-1)
    vals = D.gather_to_main(vals, dim=1)
    idx = D.gather_to_main(idx + video_offset, dim=1)
    if not D.is_main():
        return None
    top = torch.topk(vals, min(k, vals.shape[1]), dim=-1)
    return top.values, idx.gather(1, top.indices)


@torch.no_grad()
def evaluate_sharded(model, input_ids: Tensor, attention_mask: Tensor, video: Tensor, video_mask: Tensor,
                     video_offset: int, num_videos: int, text_to_video=None, bank_ids: Tensor | None = None,
                     bank_mask: Tensor | None = None, text_batch: int = 256, video_batch: int = 16,
                     chunk_size: int = 128, progress: bool = False, topk: int | None = None) -> dict:
    """:func:`tvr_models.evaluate.evaluate` with the gallery split over the ranks.

    Every rank passes all texts (``input_ids`` [Nt, L]) and its shard of videos ``video``
    [Nv_r, T, 3, H, W] (global indices from ``video_offset``; shards from
    :func:`gallery_shard` with the same ``video_batch`` and ``chunk_size`` make the result
    identical to one process's with them).
    Returns on every rank ``{"metrics", "seconds"}``, and on rank 0 ``"sim"`` [Nt, Nv]
    (``topk=None``) or ``"topk": (scores [Nt, k], video indices [Nt, k])``."""
    model.eval()
    t0 = time.perf_counter()
    tf = encode_texts_sharded(model, input_ids, attention_mask, text_batch, progress)
    vf = _encode_shard(model.encode_video, (video, video_mask), 0, len(video), video_batch, "videos", progress)
    bf = None if bank_ids is None else encode_texts_sharded(model, bank_ids, bank_mask, text_batch, progress)
    sim = score_shard(model, tf, vf, video_offset, bf, chunk_size, progress)
    out = {"metrics": shard_metrics(sim, text_to_video, video_offset, num_videos)}
    if topk is None:
        out["sim"] = D.gather_to_main(sim, dim=1)
    else:
        out["topk"] = gather_topk(sim, topk, video_offset)
    out["seconds"] = time.perf_counter() - t0
    return out


def load_gallery_shard(video_dir: str, video_ids: list[str], num_frames: int, size: int,
                       unit: int, progress: bool = False):
    """This rank's shard of a gallery on disk: ``(LoadedVideos, video_offset)`` with the
    videos of :func:`batch_shard` over the *usable* videos, ``kept`` and ``skipped`` those of
    the whole gallery (every rank's reports, so rank 0 can list them).

    Each rank first decodes its part of the requested ids (an unusable video is reported by
    the rank that meets it, with a warning, and skipped); the usable ones are then re-split
    into whole units of ``unit`` videos (:func:`gallery_unit`), so a rank decodes again only the few videos a skipped one moved
    across a shard boundary."""
    from .video import LoadedVideos, load_videos
    a, b = batch_shard(len(video_ids), unit)
    first = load_videos(video_dir, video_ids[a:b], num_frames, size, progress=progress)
    held = {a + k: i for i, k in enumerate(first.kept)}
    reports = D.all_gather_object(([a + k for k in first.kept], first.skipped))
    kept = sorted(i for ks, _ in reports for i in ks)
    skipped = {vid: why for _, sk in reports for vid, why in sk.items()}
    ca, cb = batch_shard(len(kept), unit)
    want = kept[ca:cb]
    moved = [g for g in want if g not in held]
    extra = load_videos(video_dir, [video_ids[g] for g in moved], num_frames, size)
    if extra.skipped:
        raise RuntimeError(f"rank {D.rank()}: videos another rank decoded cannot be read here: {extra.skipped}")
    extra_at = {g: i for i, g in enumerate(moved)}
    rows = [(first, held[g]) if g in held else (extra, extra_at[g]) for g in want]
    video = torch.stack([src.video[i] for src, i in rows]) if rows else first.video[:0]
    mask = torch.stack([src.video_mask[i] for src, i in rows]) if rows else first.video_mask[:0]
    return LoadedVideos(video, mask, kept, skipped), ca
