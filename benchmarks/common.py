"""What a benchmark case is, and how one provider of one case is measured.

A case names an op, its inputs at one shape, its modes and the shape sets that list it.
Providers are: ``reference`` (eager pure-PyTorch reference), ``compile`` (``torch.compile`` of
the reference), ``reference_ftz`` (the eager reference with ``torch.set_flush_denormal(True)``,
for cases marked ``denormals=True``: on x86 CPUs the authors' tau = 0.01 softmaxes produce
denormals whose microcode assists can dominate the reference's time; the fused CPU kernels
flush them (csrc/include/tvr/fp_env.h), so both comparisons are reported), each fused
backend that can run here (``cpp``, ``triton``, ``cuda``), ``copy`` for cases that declare
their traffic (one clone moving the same bytes: the bandwidth floor), and any baselines the
case adds.

Each (case, mode, provider) runs in a fresh process (run.py) so that peak memory is
measured, not estimated. On CPU, one call after the warm-up is measured for memory: glibc's
mmap threshold is pinned (``mallopt``) so every large buffer is a fresh mapping that counts,
and the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) is read above the RSS
before that call. The allocator is then put back to glibc's steady state (large buffers
reused from the heap) and warmed by one more call before the timed calls: timing under the
pinned threshold would charge a page fault per touched page to every large temporary,
slowing the references' 25 MB intermediates by up to 2x. Cases with ``warmup=0``
(minute-long reference calls, where page faults are noise) count the memory call as their
first timed call. On CUDA the peak is ``torch.cuda.max_memory_allocated`` over one call above
what the inputs hold, and the times are ``triton.testing.do_bench``'s quantiles.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import statistics
import time
from typing import Any, Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


class SkipCase(Exception):
    """A provider that cannot run here (e.g. the memory it needs is not free): the runner
    reports it as skipped, with this message, not as a failure."""


@dataclasses.dataclass
class Case:
    op: str                                   # name in tvr_kernels and tvr_kernels.reference
    name: str                                 # shape description for the table
    make_inputs: Callable[[str], dict]        # device -> call kwargs (tensors and numbers)
    grad_args: tuple[str, ...] = ()           # kwargs that need gradients in bwd modes
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    # Extra providers: name -> (inputs -> callable(**inputs)).
    baselines: dict[str, Callable[[dict], Callable]] = dataclasses.field(default_factory=dict)
    backends: tuple[str, ...] = ("cpp", "triton", "cuda")
    compile_reference: bool = True
    # Optional replacements of the reference callable (e.g. a chunked evaluation driver).
    reference: Callable | None = None
    fused: Callable | None = None
    note: str = ""
    # Calls before the clock starts (>= 1 where torch.compile must compile) and the least
    # number of timed calls: lower them for cases whose reference takes minutes per call.
    warmup: int = 3
    min_reps: int = 5
    # Also time the reference with denormals flushed (provider reference_ftz, CPU only).
    denormals: bool = False
    # Shape sets that list this case: "small" (seconds; --shapes small and pytest-benchmark),
    # "paper" (the papers' shapes: the default run), "large" (only --shapes large, which also
    # runs every "paper" case).
    shapes: tuple[str, ...] = ("paper",)
    # Providers that take minutes per call at this shape (the 1000 x 1000 eager references):
    # they run under --shapes large; the default run reuses their last recorded figure for the
    # same device, thread count and reference commit (see records.reference_commit).
    heavy: tuple[str, ...] = ()
    # Bytes the op must move in a mode (inputs read once, outputs written once): gives GB/s
    # and the ``copy`` baseline, a clone moving the same bytes, for the memory-bound ops.
    traffic: Callable[[dict, str], int] | None = None
    # Paths besides tvr_kernels/reference/<op>.py and the bench module whose last commit keys
    # a recorded reference figure (e.g. tvr_models for the model stages).
    reference_sources: tuple[str, ...] = ()


def _outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def provider_fn(case: Case, provider: str, inputs: dict) -> Callable[[], Any]:
    import tvr_kernels as tk
    import tvr_kernels.reference as ref

    reference = case.reference or getattr(ref, case.op)
    if provider in ("reference", "reference_ftz"):
        return lambda: reference(**inputs)
    if provider == "compile":
        compiled = torch.compile(reference)
        return lambda: compiled(**inputs)
    if provider in case.baselines:
        f = case.baselines[provider](inputs)
        return lambda: f(**inputs)
    if provider == "copy":
        raise ValueError("the copy baseline is built by measure(), which knows the mode")
    fused = case.fused or getattr(tk, case.op)

    def run():
        with tk.use_backend(provider):
            return fused(**inputs)
    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(param: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None).mallopt(param, value) == 1
    except (OSError, AttributeError):
        return False


def pin_malloc() -> bool:
    """Every buffer of 64 KiB or more a fresh mapping, freed memory returned at once: what a
    process started with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` has."""
    return _mallopt(_M_MMAP_THRESHOLD, 65536) and _mallopt(_M_TRIM_THRESHOLD, 0)


def _unpin_malloc() -> None:
    """glibc's steady state: its dynamic mmap threshold tops out at 32 MiB, freed heap kept."""
    _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def _cpu_peak(step: Callable[[], Any]) -> tuple[float, float]:
    """(peak RSS in MiB above the current RSS over one call of ``step``, its time in ms).
    Memory is NaN where it cannot be measured (no clear_refs, or glibc not pinnable)."""
    gc.collect()
    pinned = pin_malloc()
    have_reset = pinned and _reset_peak_rss()
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1e3
    return (max(0, _rss_kb("VmHWM") - base) / 1024 if have_reset else float("nan")), ms


def _copy_step(case: Case, mode: str, inputs: dict, device: str) -> Callable[[], Any]:
    """The ``copy`` baseline: one copy reading and writing ``traffic(mode)`` bytes in all,
    into a buffer allocated once (a fresh output past glibc's 32 MiB mmap threshold would
    page-fault on every call, and the floor would measure the kernel's page faults)."""
    nbytes = case.traffic(inputs, mode)
    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def make_step(case: Case, mode: str, provider: str, device: str) -> tuple[Callable[[], Any], dict]:
    """(one call of ``provider`` on ``case`` in ``mode``, the inputs it runs on). Inputs come
    from seed 0; ``bwd`` runs one forward here and times the backward alone."""
    torch.manual_seed(0)
    inputs = case.make_inputs(device)
    for k in case.grad_args:
        inputs[k] = inputs[k].detach().requires_grad_(mode != "fwd" and provider != "copy")
    if provider == "copy":
        return _copy_step(case, mode, inputs, device), inputs
    fn = provider_fn(case, provider, inputs)
    grads: list[torch.Tensor] | None = None

    def clear():
        for k in case.grad_args:
            inputs[k].grad = None

    if mode == "bwd":
        # One forward outside the clock, its graph retained.
        outs = _outputs(fn())
        grads = [torch.randn_like(o) for o in outs]

        def backward():
            torch.autograd.backward(outs, grads, retain_graph=True)
            clear()
        return backward, inputs

    def step():
        nonlocal grads
        if mode == "fwd":
            with torch.no_grad() if not case.grad_args else torch.enable_grad():
                return fn()
        outs = _outputs(fn())
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        clear()
        return None
    return step, inputs


def measure(case: Case, mode: str, provider: str, device: str, min_time: float = 0.5,
            max_reps: int = 50, min_reps: int = 5) -> dict:
    """Median / p20 / p80 time in ms, peak extra memory in MiB and thread count of one
    provider (``bytes``: the case's traffic in this mode, when it declares one)."""
    if provider == "reference_ftz":
        # Before anything starts the intra-op threads, which inherit the flag from this one.
        torch.set_flush_denormal(True)
    step, inputs = make_step(case, mode, provider, device)
    # Warm-up (compilation, caches, the allocator). A call longer than ``min_time`` is warm
    # after one (after compiling and one run, for torch.compile): more would only cost minutes.
    first = 1 if provider == "compile" else 0
    t0 = time.perf_counter()
    for i in range(max(case.warmup, first)):
        step()
        _sync(device)
        if i >= first and time.perf_counter() - t0 > min_time:
            break
    min_reps = min(min_reps, case.min_reps)
    if device == "cuda":
        out = _cuda_times(step, min_time)
    else:
        out = _cpu_times(step, case.warmup > 0, min_time, min_reps, max_reps)
    out["threads"] = torch.get_num_threads()
    if case.traffic is not None:
        out["bytes"] = case.traffic(inputs, mode)
    return out


def _cuda_times(step, min_time: float) -> dict:
    """Peak memory of one call above what is allocated before it, then the timed calls:
    ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events) for the quantiles."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    from triton.testing import do_bench
    rep_ms = max(1.0, min_time * 1e3)
    med, p20, p80 = do_bench(step, warmup=max(1.0, rep_ms / 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    # do_bench sizes its own repetitions from rep_ms; it does not return their count.
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mb": peak_mb, "reps": None}


def _cpu_times(step, warm: bool, min_time: float, min_reps: int, max_reps: int) -> dict:
    """Peak RSS of one call (see the module docstring), then wall-clock timed calls."""
    times = []
    t_end = time.perf_counter() + min_time   # a cold case's memory call counts as timed
    peak_mb, first_ms = _cpu_peak(step)
    _unpin_malloc()
    if warm:
        step()  # the heap grows to hold one call's buffers, as in a user's loop
        t_end = time.perf_counter() + min_time
    else:
        times.append(first_ms)
    while len(times) < max_reps:
        if time.perf_counter() >= t_end and (
                len(times) >= min_reps
                # calls of seconds: three give the median, and five would cost minutes
                or (len(times) >= min(3, min_reps) and sum(times) > 2e3 * min_time)):
            break
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3],
            "peak_mb": peak_mb, "reps": len(times)}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} cores"
