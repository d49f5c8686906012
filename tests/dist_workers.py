"""Multi-process harness of tests/test_distributed.py: ``run_ranks`` starts ``world`` processes
on loopback with a gloo process group, runs ``fn(rank, *args)`` in each and fails (never
hangs) when a rank raises or the deadline passes; and the per-rank bodies of the tests.

Processes are forked, not spawned: a spawned child re-imports torch and transformers (10 s
and more on a busy 2-core machine), a forked one starts at once. Each sets one intra-op
thread first (OpenMP's pool does not survive a fork; one thread never touches it).
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_inputs import texts, videos
from tvr_models import distributed as D

FRAMES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # a collective waiting on a dead rank raises after this long instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2, timeout: float = 60.0) -> None:
    """``fn(rank, *args)`` on ``world`` forked processes; raises on a rank's error or timeout."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world,
                             join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


# ------------------------------------------------------------------------------ inputs
def batch(n: int, seed: int):
    """``n`` pairs (ids, mask, video, video_mask), one short video."""
    ids, mask = texts(n, seed=seed)
    video, vmask = videos(n, seed=seed + 100, short=(1,) if n > 1 else ())
    return ids, mask, video, vmask


def split(b, sizes):
    """Each rank's rows of a batch (contiguous, rank order)."""
    out, start = [], 0
    for n in sizes:
        out.append(tuple(x[start:start + n] for x in b))
        start += n
    return out


def make_model(name: str, seed: int = 0):
    from tvr_models.tmass import tiny_tmass
    from tvr_models.tokenbinder import tiny_tokenbinder
    from tvr_models.ts2net import tiny_ts2net
    from tvr_models.ucofia import tiny_ucofia
    makers = {"ts2net": tiny_ts2net, "ucofia": tiny_ucofia, "tmass": tiny_tmass,
              "tokenbinder": tiny_tokenbinder}
    torch.manual_seed(seed)
    return makers[name](num_frames=FRAMES)


# ------------------------------------------------------------------------------ rank bodies
def loss_and_grads(rank: int, names, sizes, out_dir: str) -> None:
    """Per model: the loss of this rank's pairs (gathered) and the parameter gradients, raw
    and after one DDP-averaged AdamW step."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    b = batch(sum(sizes), seed=1)
    mine = split(b, sizes)[rank]
    result = {}
    for name in names:
        model = make_model(name)
        loss_seed = D.set_training_seeds(model, seed=5, step=0)
        loss = model(*mine, loss_seed=loss_seed)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        ddp = DDP(model, find_unused_parameters=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ddp(*mine, loss_seed=loss_seed).backward()
        opt.step()
        result[name] = {"loss": loss.detach(), "grads": grads,
                        "params": {k: p.detach().clone() for k, p in model.named_parameters()}}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def one_process_loss(model, parts, seed: int, step: int):
    """The loss one process computes on the concatenated batch with the seeds each rank would
    use: each rank's videos encoded with that rank's token-selection seed, the features
    concatenated in rank order, the loss under the shared loss seed."""
    from tvr_models._modules import VisualTokenSelection
    feats = []
    for r, (ids, mask, video, vmask) in enumerate(parts):
        if isinstance(getattr(model, "visual_token_selector", None), VisualTokenSelection):
            model.set_selection(seed=D.derive_seed(seed, "topk", step, r))
        feats.append((model.encode_text(ids, mask), model.encode_video(video, vmask)))
    cat = [{k: torch.cat([f[i][k] for f in feats]) for k in feats[0][i]} for i in range(2)]
    with D.shared_rng(D.derive_seed(seed, "loss", step)):
        return model.loss(*cat)
