"""``torch.distributed`` helpers for training and evaluating the models past one process.

Everything here degrades to one process: without an initialised process group
:func:`world_size` is 1, :func:`rank` 0, and every gather returns its input unchanged (the
same tensor, no copy), so the models and the drivers run one code path.

**Gathering with gradients.** The contrastive losses compare every text with every video of
the *global* batch. :func:`all_gather` concatenates each rank's rows in rank order (ranks may
hold different numbers of rows: a rank that dropped an unreadable video still takes part).
Its backward **sums** the gathered tensor's gradient over the ranks and hands each rank the
rows it produced (an all-reduce, then a slice: reduce-scatter semantics, written with
``all_reduce`` because gloo has no reduce-scatter). So if rank ``r`` computes a loss ``L_r``
on the gathered features, the gradient reaching rank ``r``'s encoders is
``sum_s dL_s / d(features_r)``, and after ``DistributedDataParallel`` *averages* the
parameter gradients over the ``N`` ranks every parameter holds the gradient of
``(1/N) sum_s L_s``. Every rank computes the same loss ``L`` on the same gathered batch (the
loss-side randomness is seeded identically on all ranks: :func:`shared_rng`), so that is
``dL/dtheta``: the gradients of one process on the concatenated batch, with no rescaling of
the loss or the learning rate. (Autograd-unaware gathers, the common mistake, give each rank
only the gradient of its own rows' terms through the others' features, and the average is
then off by a factor ``N`` on the encoders.)

**Seeds.** Randomness that acts on a rank's own inputs (TS2-Net's and UCoFiA's perturbed
top-K token selection in ``encode_video``) must differ between ranks, or rank 0's video 0 and
rank 1's video 0 draw the same noise: :func:`derive_seed` mixes a base seed with the rank and
the step. Randomness in the loss on the gathered batch (TokenBinder's Gumbel candidate
selection, T-MASS's prior noise and pooling dropout) must be the *same* on every rank:
:func:`shared_rng` runs the loss under a generator state derived from the base seed and the
step only. :func:`set_training_seeds` applies both for one step.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


# ------------------------------------------------------------------------------ process group
def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in one process): the rank that prints and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment names more than one process (``torchrun``, ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Start the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) unless it is up or there is one process.

    ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"``. ``timeout_s`` bounds how
    long a collective waits for a rank that died (it then raises instead of hanging).
    Returns the device this rank computes on (``cuda:LOCAL_RANK`` or ``cpu``)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    """Tear down the process group :func:`init_from_env` started (nothing without one)."""
    if is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items held by rank ``r`` of ``world``: the first
    ``n % world`` ranks hold one more (rank order = global order)."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


# ------------------------------------------------------------------------------ gathers
def _sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's row count (one small all-gather)."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(x) for x in out]


def _gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenation of every rank's ``x`` (rows ``sizes[r]``) in rank order. The collective
    needs equal shapes: each rank pads to the longest and the padding is cut off."""
    longest = max(sizes)
    pad = x.new_zeros(longest, *x.shape[1:])
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank()
        return _gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                       # sum of every rank's loss gradient
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def all_gather(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Rows of ``x`` [n_r, ...] from every rank, concatenated in rank order: [sum n_r, ...].

    Differentiable: the backward sums the gradient over ranks and returns this rank's rows
    (module docstring). ``sizes``: every rank's row count when known (saves one collective).
    One process: ``x`` itself."""
    if world_size() == 1:
        return x
    sizes = _sizes(x.shape[0], x.device) if sizes is None else sizes
    if x.requires_grad:
        return _AllGather.apply(x, sizes)
    return _gather_rows(x, sizes)


def all_gather_features(feats: dict, sizes: list[int] | None = None) -> dict:
    """:func:`all_gather` of every tensor of a feature dict (all share dim 0)."""
    if world_size() == 1:
        return feats
    if sizes is None:
        sizes = _sizes(len(next(iter(feats.values()))), next(iter(feats.values())).device)
    return {k: all_gather(v, sizes) for k, v in feats.items()}


def gather_pairs(text_feats: dict, video_feats: dict) -> tuple[dict, dict]:
    """Text and video features of the global batch of matching pairs (rank order), with
    gradients flowing back to the producing ranks. One process: unchanged."""
    if world_size() == 1:
        return text_feats, video_feats
    first = next(iter(text_feats.values()))
    sizes = _sizes(first.shape[0], first.device)
    return all_gather_features(text_feats, sizes), all_gather_features(video_feats, sizes)


def gather_to_main(x: Tensor, dim: int = 0) -> Tensor | None:
    """Every rank's ``x`` concatenated along ``dim`` in rank order, on rank 0 only (others get
    None); sizes along ``dim`` may differ, the other dims must agree. Not differentiable.
    One process: ``x``."""
    if world_size() == 1:
        return x
    x = x.movedim(dim, 0)
    sizes = _sizes(x.shape[0], x.device)
    pad = x.new_zeros(max(sizes), *x.shape[1:])
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes] if is_main() else None
    dist.gather(pad.contiguous(), parts, dst=0)
    if not is_main():
        return None
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).movedim(0, dim)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` itself in one process)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def broadcast_from_main(x: Tensor | None, shape, dtype, device) -> Tensor:
    """Rank 0's ``x`` on every rank (others pass None and the ``shape``/``dtype``/``device``)."""
    if world_size() == 1:
        return x
    buf = x.contiguous() if is_main() else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, src=0)
    return buf


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ------------------------------------------------------------------------------ seeds
def derive_seed(seed: int, *keys) -> int:
    """A 62-bit seed from ``seed`` and ``keys`` (ints or strings), e.g. ``(step, rank)``:
    reproducible, distinct for distinct keys, unrelated for neighbouring keys (a hash, not
    ``seed + rank``, which would make rank 1 at step 0 equal rank 0 at step 1)."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(keys)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 2


@contextlib.contextmanager
def shared_rng(seed: int | None, device: torch.device | str | None = None):
    """Run a block under torch's generators seeded with ``seed`` (CPU, and ``device``'s when
    it is CUDA), restoring the previous states afterwards, so every rank that enters with the
    same ``seed`` draws the same numbers. ``seed=None``: no change."""
    if seed is None:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def set_training_seeds(model, seed: int, step: int) -> int:
    """Seeds of one training step; returns the loss seed to pass to the model's forward
    (``loss_seed``), the same on every rank.

    A model whose perturbed top-K acts on the rank's own videos in ``encode_video``
    (TS2-Net, UCoFiA: ``visual_token_selector``) gets ``derive_seed(seed, step, rank)``;
    TokenBinder's selection runs in the loss, on the gathered batch, and is left to the loss
    seed (its ``seed`` becomes None: drawn from the shared generator)."""
    from ._modules import VisualTokenSelection
    if isinstance(getattr(model, "visual_token_selector", None), VisualTokenSelection):
        model.set_selection(seed=derive_seed(seed, "topk", step, rank()))
    elif hasattr(model, "hard_selection"):
        model.set_selection(seed=None)
    return derive_seed(seed, "loss", step)
