"""What a benchmark case is, and how one provider of one case is measured.

A case names an op, its inputs at one shape, and its modes. Providers are:
``reference`` (eager pure-PyTorch reference), ``compile`` (``torch.compile`` of the
reference), each fused backend that can run here (``cpp``, ``triton``, ``cuda``), and any
baselines the case adds (e.g. ``copy`` = one read and one write of the same tensor).

Each (case, mode, provider) runs in a fresh process so that peak memory is measured, not
estimated: on CPU the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after
warm-up) above the RSS before the timed calls, with glibc's mmap threshold pinned so freed
buffers go back to the OS and every call's allocations count; on CUDA
``torch.cuda.max_memory_allocated`` above what the inputs hold.
"""
from __future__ import annotations

import dataclasses
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


def _outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def provider_fn(case: Case, provider: str, inputs: dict) -> Callable[[], Any]:
    import tvr_kernels as tk
    import tvr_kernels.reference as ref

    reference = case.reference or getattr(ref, case.op)
    if provider == "reference":
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


def measure(case: Case, mode: str, provider: str, device: str, min_time: float = 1.0,
            max_reps: int = 50, min_reps: int = 5) -> dict:
    """Median / p20 / p80 time in ms and peak extra memory in MiB of one provider."""
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

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        have_reset = _reset_peak_rss()
        base = _rss_kb("VmRSS")
    times = []
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
    else:
        peak_mb = max(0, _rss_kb("VmHWM") - base) / 1024 if have_reset else float("nan")
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
