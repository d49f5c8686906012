"""Evaluation driver and CLI.

    python -m tvr_models.evaluate --model {ts2net,ucofia,tokenbinder,tmass} --clip DIR --annotations FILE \\
        --videos DIR [--checkpoint FILE] [--bank FILE] [--frames 12] [--batch-size 16]
    python -m tvr_models.evaluate --demo [--model ucofia]

Stages: texts and videos are encoded in batches (features kept, inputs dropped), then scored
in ``chunk_size x chunk_size`` blocks written into a preallocated [G, Nt, Nv] matrix (G score
granularities), so peak memory is the features plus one block's intermediates; the model then
combines the granularities (UCoFiA: Sinkhorn bias from a text bank). A two-stage model
(TokenBinder: a ``rerank`` method) then re-scores each text's top candidates from the
features, ``chunk_size`` texts at a time. Unusable videos are skipped with a warning and
listed in the report, with the captions that lost their video.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
import zlib

import torch
from torch import Tensor

from . import metrics as M
from ._modules import slice_features


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _batched(encode, inputs: tuple[Tensor, Tensor], batch_size: int, desc: str,
             progress: bool) -> dict:
    """``encode`` applied to ``batch_size`` rows of both inputs at a time (moved to the
    device of ``encode``'s module), features concatenated."""
    from tqdm.auto import tqdm
    n = len(inputs[0])
    device = _device(encode)
    parts = [encode(*(x[i:i + batch_size].to(device) for x in inputs))
             for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress)]
    return _cat(parts)


def _device(encode) -> torch.device | None:
    """Device of the module a bound ``encode`` method belongs to (None: leave inputs alone)."""
    module = getattr(encode, "__self__", None)
    param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return None if param is None else param.device


@torch.no_grad()
def encode_texts(model, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 256,
                 progress: bool = False) -> dict:
    """Text features of [Nt, L] ids, ``batch_size`` at a time."""
    return _batched(model.encode_text, (input_ids, attention_mask), batch_size, "texts", progress)


@torch.no_grad()
def encode_videos(model, video: Tensor, video_mask: Tensor, batch_size: int = 16,
                  progress: bool = False) -> dict:
    """Video features of [Nv, T, 3, H, W] videos, ``batch_size`` at a time."""
    return _batched(model.encode_video, (video, video_mask), batch_size, "videos", progress)


def _nrows(feats: dict) -> int:
    return len(next(iter(feats.values())))


@torch.no_grad()
def score_matrix(model, text_feats: dict, video_feats: dict, chunk_size: int = 128,
                 progress: bool = False, video_offset: int = 0) -> Tensor:
    """All granularities' scores [G, Nt, Nv], one [chunk, chunk] block at a time.

    ``video_offset``: global index of the first video (a gallery shard), passed on in each
    block's offset so that per-pair noise (T-MASS) is the same as in one process."""
    from tqdm.auto import tqdm
    nt, nv = _nrows(text_feats), _nrows(video_feats)
    first = next(iter(text_feats.values()))
    out = torch.empty(model.granularities, nt, nv, dtype=first.dtype, device=first.device)
    blocks = [(i, j) for i in range(0, nt, chunk_size) for j in range(0, nv, chunk_size)]
    for i, j in tqdm(blocks, desc="scoring", disable=not progress or len(blocks) < 4):
        s = model.score_chunk(slice_features(text_feats, slice(i, i + chunk_size)),
                              slice_features(video_feats, slice(j, j + chunk_size)), (i, j + video_offset))
        if out.dtype != s.dtype:
            out = out.to(s.dtype)
        out[:, i:i + chunk_size, j:j + chunk_size] = s
    return out


@torch.no_grad()
def score_features(model, text_feats: dict, video_feats: dict, bank_feats: dict | None = None,
                   chunk_size: int = 128, progress: bool = False, text_to_video=None) -> Tensor:
    """Final evaluation similarity [Nt, Nv] from features (the scoring stage).

    ``text_to_video`` reaches only ``model.prepare_scoring`` (T-MASS's legacy leaky scoring)."""
    text_feats, video_feats = model.prepare_scoring(text_feats, video_feats, text_to_video)
    sims = score_matrix(model, text_feats, video_feats, chunk_size, progress)
    bank = None if bank_feats is None else score_matrix(model, bank_feats, video_feats, chunk_size, progress)
    sim = model.finalize(sims, bank)
    # two-stage models: the pairwise scores pick each text's candidates, which get re-scored
    rerank = getattr(model, "rerank", None)
    return sim if rerank is None else rerank(sim, text_feats, video_feats, chunk_size, progress)


@torch.no_grad()
def evaluate(model, input_ids: Tensor, attention_mask: Tensor, video: Tensor, video_mask: Tensor,
             text_to_video=None, bank_ids: Tensor | None = None, bank_mask: Tensor | None = None,
             text_batch: int = 256, video_batch: int = 16, chunk_size: int = 128,
             progress: bool | None = None) -> dict:
    """Encode, score and rank. Returns ``{"metrics", "sim" [Nt, Nv], "seconds"}``.

    ``progress=None`` shows bars only for runs of more than 256 texts or videos."""
    model.eval()
    if progress is None:
        progress = max(len(input_ids), len(video)) > 256
    t0 = time.perf_counter()
    tf = encode_texts(model, input_ids, attention_mask, text_batch, progress)
    vf = encode_videos(model, video, video_mask, video_batch, progress)
    bf = None if bank_ids is None else encode_texts(model, bank_ids, bank_mask, text_batch, progress)
    sim = score_features(model, tf, vf, bf, chunk_size, progress, text_to_video=text_to_video)
    return {"metrics": M.retrieval_metrics(sim, text_to_video), "sim": sim,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ CLI
def build_model(name: str, backbone, num_frames: int, max_words: int, **options):
    """``options``: T-MASS keyword arguments (prior, std, legacy_leaky_scoring, ...)."""
    from .tokenbinder import TokenBinder
    from .ts2net import TS2Net
    from .ucofia import UCoFiA
    if name == "ts2net":
        return TS2Net(backbone, num_frames=num_frames)
    if name == "tokenbinder":
        return TokenBinder(backbone, num_frames=num_frames)
    if name == "ucofia":
        return UCoFiA(backbone, num_frames=num_frames, max_words=max_words)
    if name == "tmass":
        from .tmass import TMASS
        return TMASS(backbone, num_frames=num_frames, **options)
    raise ValueError(f"unknown model {name!r}")


def run(model, tokenizer, annotations_path: str, video_dir: str, num_frames: int, image_size: int,
        bank_path: str | None = None, video_batch: int = 16, chunk_size: int = 128,
        progress: bool = True, topk: int | None = None) -> dict:
    """Evaluate ``model`` on an annotation file and a video folder; returns the report.

    Under ``torch.distributed`` (more than one rank) each rank decodes and scores a shard of
    the gallery (:mod:`tvr_models.sharded`); the report's metrics are on every rank, the
    similarity matrix (or, with ``topk``, each text's ``topk`` best videos) on rank 0."""
    from . import distributed as D
    from .video import load_videos, read_annotations
    ann = read_annotations(annotations_path)
    sharded = D.world_size() > 1
    if sharded:
        from .sharded import evaluate_sharded, gallery_unit, load_gallery_shard
        loaded, offset = load_gallery_shard(video_dir, ann.video_ids, num_frames, image_size,
                                            gallery_unit(video_batch, chunk_size),
                                            progress=progress and D.is_main())
    else:
        loaded = load_videos(video_dir, ann.video_ids, num_frames, image_size, progress=progress)
    if not loaded.kept:
        raise RuntimeError(f"no usable video in {video_dir} ({len(loaded.skipped)} skipped)")
    new_index = {old: new for new, old in enumerate(loaded.kept)}
    keep_texts = [i for i, v in enumerate(ann.text_to_video) if v in new_index]
    dropped = [ann.texts[i] for i, v in enumerate(ann.text_to_video) if v not in new_index]
    ids, mask = tokenizer([ann.texts[i] for i in keep_texts])
    t2v = torch.tensor([new_index[ann.text_to_video[i]] for i in keep_texts])
    bank_ids = bank_mask = None
    if bank_path:
        bank_ids, bank_mask = tokenizer(read_annotations(bank_path).texts)
    if sharded:
        out = evaluate_sharded(model, ids, mask, loaded.video, loaded.video_mask, offset, len(loaded.kept),
                               t2v, bank_ids, bank_mask, video_batch=video_batch, chunk_size=chunk_size,
                               progress=progress and D.is_main(), topk=topk)
    else:
        out = evaluate(model, ids, mask, loaded.video, loaded.video_mask, t2v, bank_ids, bank_mask,
                       video_batch=video_batch, chunk_size=chunk_size, progress=progress)
        if topk is not None:
            top = torch.topk(out.pop("sim"), min(topk, len(loaded.kept)), dim=-1)
            out["topk"] = (top.values, top.indices)
    out.update(num_texts=len(keep_texts), num_videos=len(loaded.kept), skipped_videos=loaded.skipped,
               texts_without_video=len(dropped))
    return out


def report_text(out: dict) -> str:
    lines = [f"texts {out['num_texts']}  videos {out['num_videos']}  ({out['seconds']:.1f} s)",
             M.format_metrics(out["metrics"])]
    if out.get("skipped_videos"):
        lines.append(f"skipped {len(out['skipped_videos'])} unusable videos "
                     f"({out['texts_without_video']} captions left out):")
        lines += [f"  {vid}: {why}" for vid, why in out["skipped_videos"].items()]
    return "\n".join(lines)


def tiny_model(model_name: str, num_frames: int = 4):
    """The tiny random model of the demos (``tiny_<model>`` on the tiny CLIP)."""
    from .tmass import tiny_tmass
    from .tokenbinder import tiny_tokenbinder
    from .ts2net import tiny_ts2net
    from .ucofia import tiny_ucofia
    makers = {"ts2net": tiny_ts2net, "ucofia": tiny_ucofia, "tokenbinder": tiny_tokenbinder,
              "tmass": tiny_tmass}
    return makers[model_name](num_frames=num_frames)


def write_demo_data(directory: str, num_videos: int, num_frames: int, seed: int = 0) -> str:
    """``num_videos`` generated videos (some shorter than ``num_frames``) and one corrupt file
    in ``directory``, and a ``video_id,caption`` annotation file naming them all; returns its
    path. The same ``seed`` writes the same files (every rank of a run writes its own copy)."""
    import numpy as np

    from .video import write_test_video
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_videos):
        n = int(rng.integers(num_frames - 1, num_frames + 4))   # some shorter than T
        frames = rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)
        write_test_video(os.path.join(directory, f"video{i}.mp4"), frames)
        rows.append(f"video{i},caption {i}")
    with open(os.path.join(directory, f"video{num_videos}.mp4"), "wb") as f:
        f.write(b"corrupt")                                       # reported as skipped
    rows.append(f"video{num_videos},caption of a broken video")
    ann = os.path.join(directory, "ann.csv")
    with open(ann, "w") as f:
        f.write("video_id,caption\n" + "\n".join(rows) + "\n")
    return ann


def demo_tokenizer(vocab: int, length: int = 32):
    """A tokenizer for the demos: random ids keyed by each text's CRC stand in for BPE (no
    vocabulary needed); SOT and EOT are the two largest ids. ``texts -> (ids, mask) [N, length]``."""
    def tokenizer(texts):
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            n = min(length, 2 + len(t) % 8)
            g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
            ids[i, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
            ids[i, 0], ids[i, n - 1] = vocab - 2, vocab - 1
            mask[i, :n] = 1
        return ids, mask
    return tokenizer


def demo(model_name: str = "ucofia", num_videos: int = 8, num_frames: int = 4, seed: int = 0,
         topk: int | None = None, video_batch: int = 16) -> dict:
    """Whole pipeline on generated videos and a tiny random CLIP (a smoke run, not a benchmark).
    Under ``torch.distributed`` the gallery is sharded over the ranks (:func:`run`)."""
    from .ts2net import TINY_CLIP

    torch.manual_seed(seed)
    model = tiny_model(model_name, num_frames)
    model.set_selection(seed=seed)           # the same noise on every rank of a sharded run
    with tempfile.TemporaryDirectory() as d:
        ann = write_demo_data(d, num_videos, num_frames, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return run(model, demo_tokenizer(TINY_CLIP["vocab_size"]), ann, d, num_frames,
                       model.clip.image_size, bank_path=ann if model_name == "ucofia" else None,
                       video_batch=video_batch, progress=False, topk=topk)


MODELS = ("ts2net", "ucofia", "tokenbinder", "tmass")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model, data and weights options the evaluation and training CLIs share."""
    ap.add_argument("--model", choices=MODELS, default="ucofia")
    ap.add_argument("--clip", help="local Hugging Face CLIP directory (config, weights, tokenizer)")
    ap.add_argument("--openai-clip", help="OpenAI-format CLIP state dict (.pt) instead of --clip weights")
    ap.add_argument("--annotations", help="MSR-VTT CSV, video_id,caption CSV, or JSON")
    ap.add_argument("--videos", help="folder of videos named <video_id>.<ext>")
    ap.add_argument("--checkpoint", help="the authors' released state dict (TS2-Net / UCoFiA / T-MASS); "
                    "TokenBinder (no released weights): a state dict saved from tvr_models")
    ap.add_argument("--keep-pretrained-shifted-attention", action="store_true",
                    help="reproduce the authors' evaluated UCoFiA: the shifted layers keep the "
                         "backbone's attention, not the checkpoint's (their loader's omission)")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--prior", choices=["uniform", "normal"], default="uniform",
                    help="T-MASS: prior of the stochastic text (as the checkpoint was trained)")
    ap.add_argument("--prior-std", type=float, default=1.0, help="T-MASS: std of the normal prior")
    ap.add_argument("--demo", action="store_true", help="generated videos + tiny random CLIP")


def model_from_args(ap: argparse.ArgumentParser, args, **tmass_options):
    """``(model, tokenizer)`` from :func:`add_model_args`'s options (real data: ``--clip`` or
    ``--openai-clip``, ``--checkpoint``); exits with a usage error when a required one is missing."""
    for req in ("clip", "annotations", "videos"):
        if getattr(args, req) is None:
            ap.error(f"--{req} is required (or use --demo)")
    from .checkpoints import load_official_checkpoint
    from .clip import CLIPBackbone
    from .tokenizer import ClipTokenizer
    if args.openai_clip:
        backbone = CLIPBackbone.from_openai_state_dict(torch.load(args.openai_clip, map_location="cpu"))
    else:
        backbone = CLIPBackbone.from_pretrained(args.clip)
    tmass = dict(prior=args.prior, std=args.prior_std, **tmass_options)
    model = build_model(args.model, backbone, args.frames, args.max_words,
                        **(tmass if args.model == "tmass" else {}))
    if args.checkpoint and not getattr(model, "official_checkpoint", True):
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    elif args.checkpoint:
        rep = load_official_checkpoint(model, torch.load(args.checkpoint, map_location="cpu"),
                                       keep_pretrained_shifted_attention=args.keep_pretrained_shifted_attention)
        print(rep.summary(), file=sys.stderr)
    return model, ClipTokenizer.from_pretrained(args.clip, max_length=args.max_words)


def main(argv=None) -> int:
    from . import distributed as D
    from tvr_kernels._philox import draw_seed
    ap = argparse.ArgumentParser(prog="python -m tvr_models.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--bank", help="UCoFiA: annotation file whose captions form the Sinkhorn text bank")
    ap.add_argument("--batch-size", type=int, default=16, help="videos per encoding batch")
    ap.add_argument("--chunk-size", type=int, default=128, help="scoring block size")
    ap.add_argument("--hard-topk", action="store_true", help="deterministic hard top-k selection")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the perturbed top-k noise (T-MASS: of the stochastic texts); "
                         "under torchrun without it rank 0 draws one for every rank")
    ap.add_argument("--legacy-leaky-scoring", action="store_true",
                    help="T-MASS: the authors' evaluation, which leaks the ground truth "
                         "(comparison only, never for reporting results)")
    ap.add_argument("--topk", type=int, default=None,
                    help="keep each text's K best videos instead of the whole similarity matrix "
                         "(under torchrun nothing pair-sized is gathered; metrics are exact)")
    ap.add_argument("--save-sim", help="write the similarity matrix (or with --topk, the top-k "
                    "scores and video indices) here (torch.save)")
    args = ap.parse_args(argv)

    device = D.init_from_env()
    if args.demo:
        out = demo(args.model, topk=args.topk, video_batch=args.batch_size)
    else:
        if args.model == "tmass" and (args.bank or args.hard_topk):
            ap.error("--bank and --hard-topk are UCoFiA/TS2-Net options: T-MASS has no text bank "
                     "and no token selection")
        model, tok = model_from_args(ap, args, legacy_leaky_scoring=args.legacy_leaky_scoring)
        seed = args.seed
        if seed is None and D.world_size() > 1:
            seed = D.all_gather_object(draw_seed())[0]        # one seed, so the shards agree
        model.set_selection(hard=args.hard_topk, seed=seed)
        out = run(model.to(device), tok, args.annotations, args.videos, args.frames,
                  model.clip.image_size, args.bank, args.batch_size, args.chunk_size, topk=args.topk)
    if D.is_main():
        print(report_text(out))
        if args.save_sim:
            torch.save(out["topk"] if args.topk else out["sim"].cpu(), args.save_sim)
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
