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
    """``encode`` applied to ``batch_size`` rows of both inputs at a time, features concatenated."""
    from tqdm.auto import tqdm
    n = len(inputs[0])
    parts = [encode(*(x[i:i + batch_size] for x in inputs))
             for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress)]
    return _cat(parts)


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
                 progress: bool = False) -> Tensor:
    """All granularities' scores [G, Nt, Nv], one [chunk, chunk] block at a time."""
    from tqdm.auto import tqdm
    nt, nv = _nrows(text_feats), _nrows(video_feats)
    out = None
    blocks = [(i, j) for i in range(0, nt, chunk_size) for j in range(0, nv, chunk_size)]
    for i, j in tqdm(blocks, desc="scoring", disable=not progress or len(blocks) < 4):
        s = model.score_chunk(slice_features(text_feats, slice(i, i + chunk_size)),
                              slice_features(video_feats, slice(j, j + chunk_size)), (i, j))
        if out is None:
            out = torch.empty(s.shape[0], nt, nv, dtype=s.dtype, device=s.device)
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
        progress: bool = True) -> dict:
    """Evaluate ``model`` on an annotation file and a video folder; returns the report."""
    from .video import load_videos, read_annotations
    ann = read_annotations(annotations_path)
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
    out = evaluate(model, ids, mask, loaded.video, loaded.video_mask, t2v, bank_ids, bank_mask,
                   video_batch=video_batch, chunk_size=chunk_size, progress=progress)
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


def demo(model_name: str = "ucofia", num_videos: int = 8, num_frames: int = 4, seed: int = 0) -> dict:
    """Whole pipeline on generated videos and a tiny random CLIP (a smoke run, not a benchmark)."""
    import numpy as np

    from .tokenbinder import tiny_tokenbinder
    from .ts2net import TINY_CLIP, tiny_ts2net
    from .ucofia import tiny_ucofia
    from .video import write_test_video

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from .tmass import tiny_tmass
    makers = {"ts2net": tiny_ts2net, "ucofia": tiny_ucofia, "tokenbinder": tiny_tokenbinder,
              "tmass": tiny_tmass}
    model = makers[model_name](num_frames=num_frames)
    vocab = TINY_CLIP["vocab_size"]
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for i in range(num_videos):
            n = int(rng.integers(num_frames - 1, num_frames + 4))   # some shorter than T
            frames = rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)
            write_test_video(os.path.join(d, f"video{i}.mp4"), frames)
            rows.append(f"video{i},caption {i}")
        with open(os.path.join(d, f"video{num_videos}.mp4"), "wb") as f:
            f.write(b"corrupt")                                       # reported as skipped
        rows.append(f"video{num_videos},caption of a broken video")
        ann = os.path.join(d, "ann.csv")
        with open(ann, "w") as f:
            f.write("video_id,caption\n" + "\n".join(rows) + "\n")

        def tokenizer(texts, L=32):
            # random ids stand in for BPE (no vocabulary needed for the smoke run); EOT is the max id
            ids = torch.zeros(len(texts), L, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, t in enumerate(texts):
                n = min(L, 2 + len(t) % 8)
                g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
                ids[i, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
                ids[i, 0], ids[i, n - 1] = vocab - 2, vocab - 1
                mask[i, :n] = 1
            return ids, mask

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return run(model, tokenizer, ann, d, num_frames, model.clip.image_size,
                       bank_path=ann if model_name == "ucofia" else None, progress=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvr_models.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["ts2net", "ucofia", "tokenbinder", "tmass"], default="ucofia")
    ap.add_argument("--clip", help="local Hugging Face CLIP directory (config, weights, tokenizer)")
    ap.add_argument("--openai-clip", help="OpenAI-format CLIP state dict (.pt) instead of --clip weights")
    ap.add_argument("--annotations", help="MSR-VTT CSV, video_id,caption CSV, or JSON")
    ap.add_argument("--videos", help="folder of videos named <video_id>.<ext>")
    ap.add_argument("--checkpoint", help="the authors' released state dict (TS2-Net / UCoFiA / T-MASS); "
                    "TokenBinder (no released weights): a state dict saved from tvr_models")
    ap.add_argument("--keep-pretrained-shifted-attention", action="store_true",
                    help="reproduce the authors' evaluated UCoFiA: the shifted layers keep the "
                         "backbone's attention, not the checkpoint's (their loader's omission)")
    ap.add_argument("--bank", help="UCoFiA: annotation file whose captions form the Sinkhorn text bank")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--max-words", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="videos per encoding batch")
    ap.add_argument("--chunk-size", type=int, default=128, help="scoring block size")
    ap.add_argument("--hard-topk", action="store_true", help="deterministic hard top-k selection")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the perturbed top-k noise (T-MASS: of the stochastic texts)")
    ap.add_argument("--prior", choices=["uniform", "normal"], default="uniform",
                    help="T-MASS: prior of the stochastic text (as the checkpoint was trained)")
    ap.add_argument("--prior-std", type=float, default=1.0, help="T-MASS: std of the normal prior")
    ap.add_argument("--legacy-leaky-scoring", action="store_true",
                    help="T-MASS: the authors' evaluation, which leaks the ground truth "
                         "(comparison only, never for reporting results)")
    ap.add_argument("--save-sim", help="write the similarity matrix here (torch.save)")
    ap.add_argument("--demo", action="store_true", help="generated videos + tiny random CLIP")
    args = ap.parse_args(argv)

    if args.demo:
        out = demo(args.model)
        print(report_text(out))
        return 0
    for req in ("clip", "annotations", "videos"):
        if getattr(args, req) is None:
            ap.error(f"--{req} is required (or use --demo)")
    if args.model == "tmass" and (args.bank or args.hard_topk):
        ap.error("--bank and --hard-topk are UCoFiA/TS2-Net options: T-MASS has no text bank "
                 "and no token selection")
    from .checkpoints import load_official_checkpoint
    from .clip import CLIPBackbone
    from .tokenizer import ClipTokenizer
    if args.openai_clip:
        backbone = CLIPBackbone.from_openai_state_dict(torch.load(args.openai_clip, map_location="cpu"))
    else:
        backbone = CLIPBackbone.from_pretrained(args.clip)
    tmass = dict(prior=args.prior, std=args.prior_std, legacy_leaky_scoring=args.legacy_leaky_scoring)
    model = build_model(args.model, backbone, args.frames, args.max_words,
                        **(tmass if args.model == "tmass" else {}))
    if args.checkpoint and not getattr(model, "official_checkpoint", True):
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    elif args.checkpoint:
        rep = load_official_checkpoint(model, torch.load(args.checkpoint, map_location="cpu"),
                                       keep_pretrained_shifted_attention=args.keep_pretrained_shifted_attention)
        print(rep.summary(), file=sys.stderr)
    model.set_selection(hard=args.hard_topk, seed=args.seed)
    tok = ClipTokenizer.from_pretrained(args.clip, max_length=args.max_words)
    out = run(model, tok, args.annotations, args.videos, args.frames, backbone.image_size,
              args.bank, args.batch_size, args.chunk_size)
    print(report_text(out))
    if args.save_sim:
        torch.save(out["sim"], args.save_sim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
