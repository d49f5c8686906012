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


def _entry(rank: int, fn, world: int, port: int, init: bool, args: tuple) -> None:
    torch.set_num_threads(1)
    # what torchrun sets
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if init:
        # a collective waiting on a dead rank raises after this long instead of hanging
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2, timeout: float = 60.0, init: bool = True) -> None:
    """``fn(rank, *args)`` on ``world`` forked processes; raises on a rank's error or timeout.
    ``init=False``: no process group, only torchrun's environment (the CLIs start their own)."""
    make_model("tmass")          # transformers' lazy imports, once here rather than in each rank
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), init, args), nprocs=world,
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
    and after one DDP-averaged SGD step."""
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
        # plain SGD: the step is the gradient itself (Adam would turn rounding-level
        # differences of near-zero gradients into whole steps)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
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


# ------------------------------------------------------------------------------ evaluation
NUM_VIDEOS, VIDEO_BATCH, CHUNK = 7, 2, 4
TEXT_TO_VIDEO = [0, 1, 2, 2, 3, 4, 5, 6, 6]       # two videos with two captions


def eval_inputs():
    """Texts [9], videos [7] (one short), a bank of 5 texts."""
    ids, mask = texts(len(TEXT_TO_VIDEO), seed=2)
    video, vmask = videos(NUM_VIDEOS, seed=3, short=(4,))
    bank_ids, bank_mask = texts(5, seed=4)
    return ids, mask, video, vmask, bank_ids, bank_mask


def eval_model(name: str):
    model = make_model(name)
    model.set_selection(seed=3)
    return model.eval()


def sharded_eval(rank: int, names, out_dir: str) -> None:
    """Each model's sharded evaluation (whole matrix and top-k modes) of :func:`eval_inputs`."""
    from tvr_models.sharded import evaluate_sharded, gallery_shard
    ids, mask, video, vmask, bank_ids, bank_mask = eval_inputs()
    a, b = gallery_shard(NUM_VIDEOS, VIDEO_BATCH, CHUNK)
    assert (a, b) == ((0, 4), (4, 7))[rank]
    result = {}
    for name in names:
        model = eval_model(name)
        bank = (bank_ids, bank_mask) if name == "ucofia" else (None, None)
        kw = dict(text_batch=4, video_batch=VIDEO_BATCH, chunk_size=CHUNK)
        full = evaluate_sharded(model, ids, mask, video[a:b], vmask[a:b], a, NUM_VIDEOS,
                                torch.tensor(TEXT_TO_VIDEO), *bank, **kw)
        top = evaluate_sharded(model, ids, mask, video[a:b], vmask[a:b], a, NUM_VIDEOS,
                               torch.tensor(TEXT_TO_VIDEO), *bank, topk=3, **kw)
        assert full["metrics"] == top["metrics"], (name, full["metrics"], top["metrics"])
        result[name] = {"sim": full["sim"], "metrics": full["metrics"], "topk": top["topk"]}
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "sharded.pt"))


def gallery_with_a_broken_video(rank: int, video_dir: str, out_dir: str) -> None:
    """``evaluate.run`` on a folder whose last video (on rank 1's part) is corrupt."""
    import warnings

    from tvr_models.evaluate import demo_tokenizer, run
    from tvr_models.ts2net import TINY_CLIP
    model = eval_model("ts2net")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run(model, demo_tokenizer(TINY_CLIP["vocab_size"]), os.path.join(video_dir, "ann.csv"),
                  video_dir, FRAMES, 32, video_batch=2, chunk_size=2, progress=False)
    reported = [str(w.message) for w in seen if "skipping video" in str(w.message)]
    torch.save({"out": out, "warned": reported}, os.path.join(out_dir, f"run{rank}.pt"))


# ------------------------------------------------------------------------------ training
def train_run(data_dir: str, model_name: str, out_dir: str | None = None, resume: str | None = None,
              max_steps: int | None = None, **kw) -> dict:
    """``train`` of a fresh tiny model (the same weights on every rank) on the pairs written
    by ``evaluate.write_demo_data`` in ``data_dir`` (one of them unreadable)."""
    from tvr_models.evaluate import demo_tokenizer
    from tvr_models.train import pairs_from_annotations, train
    from tvr_models.ts2net import TINY_CLIP
    model = make_model(model_name)
    dataset = pairs_from_annotations(os.path.join(data_dir, "ann.csv"), data_dir,
                                     demo_tokenizer(TINY_CLIP["vocab_size"]), FRAMES, 32)
    out = train(model, dataset, batch_size=kw.pop("batch_size", 1), epochs=2, max_steps=max_steps,
                lr=1e-3, clip_lr=1e-4, out_dir=out_dir, resume=resume, progress=False, **kw)
    return {**out, "model": model}


def resumed_training(rank: int, data_dir: str, model_name: str, out_dir: str) -> None:
    """4 steps uninterrupted vs 3 steps, a checkpoint and the 4th resumed (mid-epoch)."""
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)
    whole = train_run(data_dir, model_name, max_steps=4, accum=2)
    # accumulation with DDP syncing on the last micro-batch run: the ranks' weights agree
    sums = D.all_gather_object([float(p.double().sum()) for p in whole["model"].parameters()])
    assert sums[0] == sums[1]
    first = train_run(data_dir, model_name, out_dir=out_dir, max_steps=3, accum=2)
    rest = train_run(data_dir, model_name, resume=first["checkpoint"], max_steps=4, accum=2)
    runs = {"whole": whole, "first": first, "rest": rest}
    torch.save({k: {**v, "model": None} for k, v in runs.items()}, os.path.join(out_dir, f"train{rank}.pt"))


def clis(rank: int, out_dir: str, second_port: int) -> None:
    """Both CLIs as ``torchrun`` starts them (process group from the environment), one after
    the other: the second on a fresh port (the first group's store may still hold its own)."""
    import warnings

    from tvr_models import evaluate as E
    from tvr_models import train as T
    warnings.simplefilter("ignore", RuntimeWarning)
    assert E.main(["--demo", "--model", "ucofia", "--batch-size", "2", "--chunk-size", "2",
                   "--save-sim", os.path.join(out_dir, "sim.pt")]) == 0
    os.environ["MASTER_PORT"] = str(second_port)
    assert T.main(["--demo", "--model", "tmass", "--max-steps", "2", "--batch-size", "2",
                   "--no-progress", "--out", out_dir]) == 0
