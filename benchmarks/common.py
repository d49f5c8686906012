"""What a benchmark case is, and how one provider of one case is measured.

A case names an op, its inputs at one shape, and its modes. Providers are:
``reference`` (eager pure-PyTorch reference), ``compile`` (``torch.compile`` of the
reference), ``reference_ftz`` (the eager reference with ``torch.set_flush_denormal(True)``, for
cases marked ``denormals=True``: on x86 CPUs the authors' tau = 0.01 softmaxes produce
denormals whose microcode assists can dominate the reference's time; the fused CPU kernels
flush them (csrc/include/tvr/fp_env.h), so both comparisons are reported), each fused
backend that can run here (``cpp``, ``triton``, ``cuda``), and any baselines the case adds
(e.g. ``copy`` = one read and one write of the same tensor).

Each (case, mode, provider) runs in a fresh process so that peak memory is measured, not
estimated. On CPU, one call after the warm-up is measured for memory: glibc's mmap threshold
is pinned (run.py starts the worker with ``MALLOC_MMAP_THRESHOLD_``) so every large buffer is
a fresh mapping that counts, and the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) is read above the RSS before that call. The allocator is then put
back to glibc's steady state (large buffers reused from the heap, ``mallopt``) and warmed by
one more call before the timed calls: timing under the pinned threshold would charge a page
fault per touched page to every large temporary, slowing the references' 25 MB
intermediates by up to 2x. Cases with ``warmup=0`` (minute-long reference calls, where page
faults are noise) count the memory call as their first timed call. On CUDA the peak is
``torch.cuda.max_memory_allocated`` over the timed calls, above what the inputs hold.
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


def _unpin_malloc() -> None:
    """glibc's steady state: its dynamic mmap threshold tops out at 32 MiB, freed heap kept."""
    _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def _cpu_peak(step: Callable[[], Any]) -> tuple[float, float]:
    """(peak RSS in MiB above the current RSS over one call of ``step``, its time in ms).
    Memory is NaN where it cannot be measured (no clear_refs, or glibc not pinnable)."""
    gc.collect()
    pinned = _mallopt(_M_MMAP_THRESHOLD, 65536) and _mallopt(_M_TRIM_THRESHOLD, 0)
    have_reset = pinned and _reset_peak_rss()
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1e3
    return (max(0, _rss_kb("VmHWM") - base) / 1024 if have_reset else float("nan")), ms


def measure(case: Case, mode: str, provider: str, device: str, min_time: float = 1.0,
            max_reps: int = 50, min_reps: int = 5) -> dict:
    """Median / p20 / p80 time in ms and peak extra memory in MiB of one provider."""
    if provider == "reference_ftz":
        # Before anything starts the intra-op threads, which inherit the flag from this one.
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    inputs = case.make_inputs(device)
    for k in case.grad_args:
        inputs[k] = inputs[k].detach().requires_grad_(mode != "fwd")
    fn = provider_fn(case, provider, inputs)
    grads: list[torch.Tensor] | None = None

    def step():
        nonlocal grads
        if mode == "fwd":
            with torch.no_grad() if not case.grad_args else torch.enable_grad():
                return fn()
        out = fn()
        outs = _outputs(out)
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for k in case.grad_args:
            inputs[k].grad = None
        return None

    if mode == "bwd":
        # Time the backward alone: one forward outside the clock, graph retained.
        out = fn()
        outs = _outputs(out)
        grads = [torch.randn_like(o) for o in outs]

        def step():  # noqa: F811
            torch.autograd.backward(outs, grads, retain_graph=True)
            for k in case.grad_args:
                inputs[k].grad = None

    for _ in range(max(case.warmup, 1 if provider == "compile" else 0)):  # warm-up, compilation
        step()
    _sync(device)

    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_mb, first_ms = _cpu_peak(step)
        _unpin_malloc()
        if case.warmup > 0:
            step()  # the heap grows to hold one call's buffers, as in a user's loop
        else:
            times.append(first_ms)
    min_reps = min(min_reps, case.min_reps)
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
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
