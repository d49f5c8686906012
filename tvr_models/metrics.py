"""Retrieval metrics (SPEC "Retrieval metrics").

Rank convention: the rank of a ground truth is ``1 + (number of candidates scoring strictly
higher)``. Ties are therefore broken **in favour of the ground truth**: a query whose ground
truth ties with ten other candidates at the top still has rank 1. This is deterministic and
order-independent. (CLIP4Clip's ``compute_metrics`` double-counts ties via a sort-and-compare
on the flattened matrix; X-Pool breaks them at random. Ties are rare with float scores, but
they happen with saturated or quantised similarities, which is why the rule is fixed here.)

Multi-caption: several texts may describe one video (``text_to_video[i]`` is text ``i``'s
video). Text-to-video ranks each text's video among all videos. Video-to-text ranks, for each
video, its best-placed caption among all texts: ``min over its captions c of
1 + #{texts t : sim[t, j] > sim[c, j]}`` (retrieving any correct caption counts).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ops

RECALLS = (1, 5, 10, 50)


def _check(sim: Tensor, text_to_video: Tensor | None) -> Tensor:
    if sim.dim() != 2:
        raise ValueError(f"sim must be [Nt, Nv], got shape {tuple(sim.shape)}")
    if torch.isnan(sim).any():
        raise ValueError("sim contains NaN: the similarity matrix is broken (refusing to rank)")
    nt, nv = sim.shape
    if text_to_video is None:
        if nt != nv:
            raise ValueError(f"sim is {nt} x {nv}; pass text_to_video when texts != videos")
        return torch.arange(nt, device=sim.device)
    t2v = torch.as_tensor(text_to_video, device=sim.device).long()
    if t2v.shape != (nt,):
        raise ValueError(f"text_to_video must be [{nt}], got {tuple(t2v.shape)}")
    if nt and (t2v.min() < 0 or t2v.max() >= nv):
        raise ValueError(f"text_to_video has indices outside [0, {nv})")
    return t2v


def t2v_ranks(sim: Tensor, text_to_video: Tensor | None = None) -> Tensor:
    """1-based rank of each text's video. sim: [Nt, Nv]; returns int64 [Nt]."""
    t2v = _check(sim, text_to_video)
    gt = sim.gather(1, t2v[:, None])                       # [Nt, 1]
    return 1 + (sim > gt).sum(1)


def v2t_ranks(sim: Tensor, text_to_video: Tensor | None = None) -> Tensor:
    """1-based rank of each video's best-placed caption. sim: [Nt, Nv]; returns int64 [Nv].

    A video with no caption has no rank: ValueError."""
    t2v = _check(sim, text_to_video)
    best = best_caption_ranks(sim, torch.arange(sim.shape[0], device=sim.device), t2v)
    if (best == torch.iinfo(torch.long).max).any():
        missing = (best == torch.iinfo(torch.long).max).nonzero().flatten()[:5].tolist()
        raise ValueError(f"videos without any caption (first few indices): {missing}")
    return best


def best_caption_ranks(sim: Tensor, captions: Tensor, columns: Tensor) -> Tensor:
    """For each column of ``sim`` [Nt, Nv], the best rank among its captions: caption
    ``captions[i]`` (a row) describes column ``columns[i]``; its rank is ``1 + #{t : sim[t, c] >
    sim[captions[i], c]}`` over all rows. Returns int64 [Nv], int64 max where a column has no
    caption. (A sharded evaluation calls it with its own columns.)"""
    # rank of caption i within its column: 1 + #{t : sim[t, v] > sim[i, v]}
    cols = sim[:, columns]                                  # [Nt(t), K(i)] column of i's video
    own = sim[captions, columns]                            # [K]
    r = 1 + (cols > own[None, :]).sum(0)                    # [K]
    best = torch.full((sim.shape[1],), torch.iinfo(torch.long).max, dtype=torch.long, device=sim.device)
    return best.scatter_reduce(0, columns, r, reduce="amin")


def summarize(ranks: Tensor, recalls=RECALLS) -> dict[str, float]:
    """R@k (percent), MdR and MnR of 1-based ranks [N]."""
    r = ranks.double()
    out = {f"R@{k}": 100.0 * (r <= k).double().mean().item() for k in recalls}
    out["MdR"] = float(torch.quantile(r, 0.5).item()) if len(r) else math.nan
    out["MnR"] = r.mean().item() if len(r) else math.nan
    return out


def retrieval_metrics(sim: Tensor, text_to_video: Tensor | None = None) -> dict[str, dict]:
    """Text-to-video and video-to-text metrics of a similarity matrix.

    Args:
        sim: [Nt, Nv] similarity (higher = more similar); NaN raises ValueError.
        text_to_video: [Nt] index of each text's video; default ``arange`` (Nt == Nv).
    Returns:
        ``{"t2v": {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR"}, "v2t": {...}}``.
    """
    sim = sim.detach()
    return {"t2v": summarize(t2v_ranks(sim, text_to_video)),
            "v2t": summarize(v2t_ranks(sim, text_to_video))}


def dsl(sim: Tensor) -> Tensor:
    """Dual softmax post-processing: ``sim * softmax(sim, dim=0)``. [Nt, Nv] -> [Nt, Nv]."""
    return sim * torch.softmax(sim, dim=0)


def sinkhorn_bias(sim: Tensor, bank_sim: Tensor, n_iters: int = 4, log_domain: bool = False) -> Tensor:
    """UCoFiA's post-processing: ``sim + col_bias`` from ``tk.sinkhorn_knopp(bank_sim)``.

    sim: [Nt, Nv] test scores; bank_sim: [Nb, Nv] scores of a text bank against the same
    videos (same granularity and scale). Returns [Nt, Nv]."""
    if bank_sim.shape[1] != sim.shape[1]:
        raise ValueError(f"bank_sim has {bank_sim.shape[1]} videos, sim has {sim.shape[1]}")
    _, col_bias = _ops.op("sinkhorn_knopp")(bank_sim, n_iters, log_domain=log_domain)
    return sim + col_bias[None, :].to(sim.dtype)


def format_metrics(m: dict[str, dict]) -> str:
    """One line per direction, e.g. ``t2v R@1 42.0 R@5 ... MdR 2.0 MnR 15.3``."""
    lines = []
    for d, vals in m.items():
        lines.append(f"{d}: " + "  ".join(f"{k} {v:.1f}" for k, v in vals.items()))
    return "\n".join(lines)
