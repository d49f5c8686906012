"""Training driver and CLI, the same on one process and under ``torchrun``.

    python -m tvr_models.train --model ts2net --demo
    python -m tvr_models.train --model ucofia --clip DIR --annotations MSRVTT_train.9k.csv \\
        --videos DIR --out runs/ucofia [--batch-size 32] [--accum 1] [--epochs 5]
    torchrun --nproc_per_node=8 -m tvr_models.train --model tmass --clip DIR ...

Per optimiser step: ``--accum`` micro-batches of ``--batch-size`` pairs on each rank (a
``DistributedSampler`` gives each rank its part of the epoch), each one's loss over the
*global* micro-batch (features all-gathered with gradients, :mod:`tvr_models.distributed`),
divided by ``--accum``; DDP averages the gradients, which then equal one process's on the
concatenated batch. AdamW with two learning rates (the CLIP backbone, ``clip.*``, and the
layers the paper adds), weight decay on matrices only (not on biases, norms, gains or the
logit scale), a linear warm-up over ``--warmup`` of the steps then a cosine decay to 0.
``torch.autocast`` in bf16 on GPU (``--amp``). Unreadable videos are reported by the rank
that meets them and dropped from its micro-batch (ranks may then hold different numbers of
pairs; the gather allows it); a micro-batch empty on some rank is skipped by all.

Checkpoints (``--out``, every ``--save-every`` steps and at the end) hold the model, the
optimiser, the scheduler, the step and every rank's RNG states; ``--resume FILE`` continues
with the same data order, seeds and losses as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import distributed as D

# (new layers' lr, CLIP backbone's lr, weight decay, warm-up fraction, pairs per global batch,
# epochs) from the authors' MSR-VTT run scripts: TS2-Net and UCoFiA (CLIP4Clip's recipe:
# --lr 1e-4 --coef_lr 1e-3), T-MASS (X-Pool's: --noclip_lr 3e-5, --clip_lr 1e-6, batch 32),
# TokenBinder (the paper: 1e-4 fusion, 1e-6 elsewhere, wd 0.2, batch 128).
PAPER_RECIPES = {
    "ts2net": dict(lr=1e-4, clip_lr=1e-7, weight_decay=0.2, warmup=0.1, batch=128, epochs=5),
    "ucofia": dict(lr=1e-4, clip_lr=1e-7, weight_decay=0.2, warmup=0.1, batch=128, epochs=5),
    "tmass": dict(lr=3e-5, clip_lr=1e-6, weight_decay=0.2, warmup=0.1, batch=32, epochs=5),
    "tokenbinder": dict(lr=1e-4, clip_lr=1e-6, weight_decay=0.2, warmup=0.1, batch=128, epochs=5),
}


# ------------------------------------------------------------------------------ data
class PairDataset(Dataset):
    """Caption-video pairs read from disk per item: ``(index, ids [L], mask [L], video
    [T, 3, S, S], video_mask [T])``, or ``(index, video_id, error)`` for an unreadable video
    (the collate function reports and drops it)."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, video_paths: list[str],
                 video_ids: list[str], num_frames: int, size: int):
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.video_paths, self.video_ids = video_paths, video_ids
        self.num_frames, self.size = num_frames, size

    def __len__(self) -> int:
        return len(self.video_paths)

    def __getitem__(self, i: int):
        from .video import VideoError, load_video
        try:
            video, mask = load_video(self.video_paths[i], self.num_frames, self.size)
        except VideoError as e:
            return i, self.video_ids[i], str(e)
        return i, self.input_ids[i], self.attention_mask[i], video, mask


def pairs_from_annotations(annotations: str, video_dir: str, tokenizer, num_frames: int,
                           size: int) -> PairDataset:
    """One pair per caption of an annotation file (several captions of a video: several pairs)."""
    from .video import find_video, read_annotations
    ann = read_annotations(annotations)
    ids, mask = tokenizer(ann.texts)
    vids = [ann.video_ids[v] for v in ann.text_to_video]
    return PairDataset(ids, mask, [find_video(video_dir, v) for v in vids], vids, num_frames, size)


@dataclass
class Batch:
    tensors: tuple[Tensor, Tensor, Tensor, Tensor] | None    # ids, mask, video, video_mask
    skipped: dict[str, str]                                  # video_id -> why


def collate(items) -> Batch:
    """Stack the readable pairs; the unreadable ones are listed in ``skipped``."""
    good = [x for x in items if len(x) == 5]
    skipped = {x[1]: x[2] for x in items if len(x) == 3}
    if not good:
        return Batch(None, skipped)
    return Batch(tuple(torch.stack([x[k] for x in good]) for k in range(1, 5)), skipped)


class _From(Sampler):
    """A sampler's indices from position ``start`` on (resuming inside an epoch)."""

    def __init__(self, sampler: Sampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return iter(list(self.sampler)[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)


# ------------------------------------------------------------------------------ optimisation
def param_groups(model, lr: float, clip_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: CLIP backbone (``clip.*``) at ``clip_lr``, the rest at ``lr``; weight
    decay only on parameters of 2 or more dims (no biases, norms, gains, logit scale)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("clip."), p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": clip_lr if backbone else lr, "weight_decay": weight_decay if decay else 0.0}
            for (backbone, decay), ps in sorted(groups.items())]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier of step ``s``: ``(s + 1) / warmup`` during the warm-up, then
    ``0.5 (1 + cos(pi * progress))`` down to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, model, optimizer, scheduler, step: int, config: dict) -> None:
    """Every rank calls it (its RNG state is gathered); rank 0 writes ``path`` atomically."""
    states = D.all_gather_object(rng_state())
    if D.is_main():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "rng": states,
                    "world_size": D.world_size(), "config": config}, tmp)
        os.replace(tmp, path)
    D.barrier()                       # no rank goes on (and reads it) before it is written


# ------------------------------------------------------------------------------ the loop
def train(model, dataset: Dataset, *, batch_size: int, epochs: int = 1, max_steps: int | None = None,
          accum: int = 1, lr: float = 1e-4, clip_lr: float = 1e-7, weight_decay: float = 0.2,
          warmup: float = 0.1, amp: bool = False, seed: int = 0, out_dir: str | None = None,
          save_every: int = 0, resume: str | None = None, num_workers: int = 0,
          progress: bool = True, device: torch.device | str = "cpu") -> dict:
    """Train ``model`` on ``dataset`` (items of :class:`PairDataset`); every rank calls it.

    ``batch_size`` pairs per rank and micro-batch; ``accum`` micro-batches per step;
    ``max_steps`` stops early (the schedule still spans ``epochs``). Returns ``{"losses":
    [loss of each step], "step", "skipped": {video_id: why}, "checkpoint": path | None}``
    (the loss of a step: the mean of its micro-batches' global losses, the same on every rank).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    device = torch.device(device)
    model.to(device).train()
    world, rank = D.world_size(), D.rank()
    # given num_replicas and rank, the sampler needs no process group: one process uses it too
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_rank = len(sampler)
    steps_per_epoch = per_rank // (batch_size * accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{per_rank} pairs per rank make no step of {accum} x {batch_size}")
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(param_groups(model, lr, clip_lr, weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, round(warmup * total)))
    step = 0
    if resume:
        ck = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step = ck["step"]
        if ck["world_size"] == world:
            set_rng_state(ck["rng"][rank])
        else:
            warnings.warn(f"resuming {ck['world_size']} ranks' run on {world}: RNG states reseeded")
            torch.manual_seed(D.derive_seed(seed, "resume", step, rank))
    ddp = DDP(model, find_unused_parameters=True) if world > 1 else model
    config = dict(batch_size=batch_size, accum=accum, epochs=epochs, lr=lr, clip_lr=clip_lr,
                  weight_decay=weight_decay, warmup=warmup, seed=seed, world_size=world)
    stop = total if max_steps is None else min(total, max_steps)
    losses, skipped, ckpt = [], {}, None
    from tqdm.auto import tqdm
    bar = tqdm(total=stop, initial=step, desc="train", disable=not (progress and D.is_main()))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    while step < stop:
        epoch, done = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=_From(sampler, done * accum * batch_size),
                            collate_fn=collate, num_workers=num_workers, drop_last=True,
                            # its own generator: the loader never draws from the global one
                            generator=torch.Generator().manual_seed(D.derive_seed(seed, "loader", epoch)))
        micro = iter(loader)
        for _ in range(done, steps_per_epoch):
            total_loss, pending = 0.0, None

            def backward(tensors, key: int, sync: bool) -> float:
                loss_seed = D.set_training_seeds(model, seed, key)
                with nullcontext() if sync or world == 1 else ddp.no_sync():
                    with autocast:
                        loss = ddp(*(x.to(device) for x in tensors), loss_seed=loss_seed)
                    (loss / accum).backward()
                return loss.item() / accum

            # one micro-batch behind, so that the last one *run* is the one DDP syncs on
            for m in range(accum):
                batch = next(micro)
                for vid, why in batch.skipped.items():
                    warnings.warn(f"rank {rank}: skipping video {vid!r}: {why}", RuntimeWarning)
                skipped.update(batch.skipped)
                if D.any_rank(batch.tensors is None, device):
                    continue                       # some rank has no pair left: all skip it
                if pending is not None:
                    total_loss += backward(*pending, sync=False)
                pending = (batch.tensors, step * accum + m)
            if pending is not None:
                total_loss += backward(*pending, sync=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(total_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{sched.get_last_lr()[-1]:.2e}")
            if out_dir and (step == stop or (save_every and step % save_every == 0)):
                ckpt = os.path.join(out_dir, f"step{step}.pt")
                save_checkpoint(ckpt, model, opt, sched, step, config)
            if step >= stop:
                break
    bar.close()
    every = {k: v for sk in D.all_gather_object(skipped) for k, v in sk.items()}
    return {"losses": losses, "step": step, "skipped": every, "checkpoint": ckpt}


# ------------------------------------------------------------------------------ CLI
def demo_dataset(directory: str, model, num_videos: int = 12, seed: int = 0) -> PairDataset:
    """Generated videos (and one corrupt file) in ``directory`` as training pairs."""
    from .evaluate import demo_tokenizer, write_demo_data
    from .ts2net import TINY_CLIP
    ann = write_demo_data(directory, num_videos, model.num_frames, seed)
    tok = demo_tokenizer(TINY_CLIP["vocab_size"])
    return pairs_from_annotations(ann, directory, tok, model.num_frames, model.clip.image_size)


def main(argv=None) -> int:
    from .evaluate import add_model_args, model_from_args, tiny_model
    ap = argparse.ArgumentParser(prog="python -m tvr_models.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="pairs per rank and micro-batch (default: the paper's global batch / ranks / accum)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--epochs", type=int, default=None, help="default: the paper's")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--lr", type=float, default=None, help="new layers' learning rate (default: the paper's)")
    ap.add_argument("--clip-lr", type=float, default=None, help="CLIP backbone's learning rate")
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the steps")
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                    help="autocast dtype: auto = bf16 on GPU, off on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="checkpoint folder (step<N>.pt)")
    ap.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    ap.add_argument("--resume", help="checkpoint to continue from")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    device = D.init_from_env()
    recipe = PAPER_RECIPES[args.model]
    pick = lambda v, k: recipe[k] if v is None else v  # noqa: E731
    torch.manual_seed(args.seed)                        # the same initial weights on every rank
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            model = tiny_model(args.model)
            dataset = demo_dataset(tmp, model, seed=args.seed)
            batch = args.batch_size or 4
            epochs = args.epochs or 2
        else:
            model, tok = model_from_args(ap, args)
            dataset = pairs_from_annotations(args.annotations, args.videos, tok, args.frames,
                                             model.clip.image_size)
            batch = args.batch_size or max(1, recipe["batch"] // (D.world_size() * args.accum))
            epochs = pick(args.epochs, "epochs")
        amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
        out = train(model, dataset, batch_size=batch, epochs=epochs, max_steps=args.max_steps,
                    accum=args.accum, lr=pick(args.lr, "lr"), clip_lr=pick(args.clip_lr, "clip_lr"),
                    weight_decay=pick(args.weight_decay, "weight_decay"), warmup=pick(args.warmup, "warmup"),
                    amp=amp, seed=args.seed, out_dir=args.out, save_every=args.save_every,
                    resume=args.resume, num_workers=args.num_workers, progress=not args.no_progress,
                    device=device)
    if D.is_main():
        shown = out["losses"] if len(out["losses"]) <= 20 else out["losses"][:5] + out["losses"][-5:]
        print(f"{args.model}: {out['step']} steps on {D.world_size()} rank(s), global batch "
              f"{batch * args.accum * D.world_size()}; losses " + " ".join(f"{x:.4f}" for x in shown))
        if out["skipped"]:
            print(f"skipped {len(out['skipped'])} unusable videos:")
            print("\n".join(f"  {vid}: {why}" for vid, why in out["skipped"].items()))
        if out["checkpoint"]:
            print(f"checkpoint: {out['checkpoint']}")
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
