"""Compile every Triton launch the ops make for a GPU target, on a machine without a GPU.

The Triton interpreter (how CI runs the kernels on CPU tensors) executes kernels as Python:
it accepts non-constexpr globals, loop-carried shape changes and shared-memory-hungry tiles
that the compiler rejects or that fail at launch. This module closes that gap without a GPU:

1. :func:`capture` runs the public ops (forward and backward) on CPU tensors with the triton
   backend while ``triton.runtime.jit.JITFunction.run`` is replaced by a recorder, so every
   launch the launchers make is recorded (kernel, grid, arguments, options) and nothing runs.
   New kernels and changed launchers are covered without editing this file: only the cases
   (ops at shapes) are listed here.
2. :func:`compile_launch` binds the recorded arguments exactly as a GPU launch would (the
   launcher's own binder: an int argument equal to 1 becomes a constexpr, pointers are
   specialised on 16-byte alignment) and compiles them with ``triton.compile`` for
   ``GPUTarget("cuda", arch, 32)``, through PTX to a cubin with the ``ptxas`` that triton
   ships. Registers and spills come from ``ptxas -v``; shared memory from the compiled
   kernel's metadata, checked against the device limit; the grid against CUDA's limits.

``python -m tvr_kernels.info --compile sm_80,sm_90`` prints the table; ``tests/
test_compile_check.py`` runs it in CI. The recorded launches never run, so outputs of one
launch that feed the next hold garbage: fine for compiling, which depends on shapes, dtypes,
alignment and the integer arguments' values only.

Needs triton >= 3.4 (the binder API), without ``TRITON_INTERPRET`` set.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Iterator

import torch

from . import _backend

# Max shared memory per block (opt-in), bytes, per compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
GRID_LIMIT = (2 ** 31 - 1, 65535, 65535)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEEDS = (0, 1, 2 ** 32 + 7)  # seeds whose key words are 0, 1 (constexpr-specialised) and > 1


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""
    kernel: object          # triton.runtime.jit.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str = ""
    guarded: bool = True    # launched inside tvr_kernels.triton.device_guard

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclasses.dataclass
class Result:
    kernel: str
    cases: list
    arch: int
    grid: tuple
    signature: str = ""
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    smem: int | None = None
    num_warps: int | None = None
    error: str = ""
    seconds: float = 0.0
    unguarded: bool = False


    @property
    def smem_ok(self) -> bool:
        return self.smem is None or self.smem <= SMEM_LIMIT.get(self.arch, SMEM_LIMIT[80])

    @property
    def grid_ok(self) -> bool:
        return all(g <= lim for g, lim in zip(self.grid, GRID_LIMIT))

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def ok(self) -> bool:
        return not self.error and self.smem_ok and self.grid_ok and not self.unguarded


# --------------------------------------------------------------------------------------------
# Capture

@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block, Triton launches are recorded into the yielded list instead of run,
    and the triton backend accepts CPU tensors."""
    if _backend.triton_interpret():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: the interpreter replaces "
                           "@triton.jit kernels by Python functions that cannot be compiled")
    from triton.runtime.jit import JITFunction

    from .triton import inside_device_guard

    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            raise NotImplementedError("compile_check: callable grids are not recorded")
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        launches.append(Launch(self, g, args, dict(kwargs), guarded=inside_device_guard()))
        return None

    real_run = JITFunction.run
    JITFunction.run = run
    before = _backend._launch_capture
    _backend._launch_capture = True
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        _backend._launch_capture = before


def capture(cases: Iterable["Case"]) -> list[Launch]:
    """Record the launches of every case (each labelled with its case)."""
    out: list[Launch] = []
    for case in cases:
        with recording() as launches, _backend.use_backend("triton"):
            case.run()
        for launch in launches:
            launch.case = case.label
        out.extend(launches)
    return out


# --------------------------------------------------------------------------------------------
# Compile

_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_path() -> str:
    from triton import knobs
    return knobs.nvidia.ptxas.path


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) of the kernel in ``ptx``."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas_path(), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a"
                              if arch >= 90 else f"--gpu-name=sm_{arch}", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas -v failed:\n{log}")
    usage = _parse_ptxas(log)
    if usage is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return usage


def _parse_ptxas(log: str) -> tuple[int, int, int, int] | None:
    """(registers, stack frame, spill stores, spill loads) from a `ptxas -v` log, or None."""
    regs = _PTXAS_LINE.search(log)
    spill = _SPILL_LINE.search(log)
    if regs is None or spill is None:
        return None
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(spill.group(3))


@contextlib.contextmanager
def _ptxas_log_printed() -> Iterator[None]:
    """Ask triton to print the log of the `ptxas -v` it runs (a knob since triton 3.4)."""
    try:
        from triton import knobs
        before = knobs.nvidia.dump_ptxas_log
    except (ImportError, AttributeError):
        yield
        return
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = before


_BACKENDS: dict = {}
_BINDERS: dict = {}


def _bind(launch: Launch, arch: int):
    """(target, ASTSource, options) of ``launch`` compiled for ``sm_<arch>``, bound by the
    same binder a GPU launch uses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    if arch not in _BACKENDS:
        target = GPUTarget("cuda", arch, 32)
        _BACKENDS[arch] = (target, make_backend(target))
    target, backend = _BACKENDS[arch]
    if (fn, arch) not in _BINDERS:
        _BINDERS[fn, arch] = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = _BINDERS[fn, arch](*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec,
                                                          options)
    return target, ASTSource(fn, signature, constexprs, attrs), options


def _key(launch: Launch, arch: int) -> str:
    """What makes two launches the same compiled kernel (the JIT's own cache key)."""
    target, src, options = _bind(launch, arch)
    return f"{launch.kernel.fn.__module__}.{launch.name}|{src.hash()}|{options.hash()}"


def compile_launch(launch: Launch, arch: int) -> Result:
    """Compile one recorded launch for ``sm_<arch>``; errors are returned, not raised."""
    import triton

    res = Result(launch.name, [launch.case], arch, launch.grid)
    t0 = time.perf_counter()
    try:
        target, src, options = _bind(launch, arch)
        res.signature = ", ".join(f"{k}:{v}" for k, v in src.signature.items()
                                  if v != "constexpr")
        res.num_warps = options.num_warps
        # Triton runs `ptxas -v` itself and prints its log when asked (and the failing PTX in
        # full on an error): capture both. A kernel from triton's cache ran no ptxas, so then
        # ptxas runs once more on its PTX.
        out = io.StringIO()
        with _ptxas_log_printed(), contextlib.redirect_stdout(out):
            ck = triton.compile(src, target=target, options=options.__dict__)
        res.smem = int(ck.metadata.shared)
        usage = _parse_ptxas(out.getvalue())
        res.regs, res.stack, res.spill_stores, res.spill_loads = (
            usage if usage is not None else _ptxas_usage(ck.asm["ptx"], arch))
    except Exception as e:  # noqa: BLE001 -- a failure is this check's result
        msg = f"{type(e).__name__}: {e}"
        res.error = msg if len(msg) < 2000 else msg[:2000] + " ..."
    res.seconds = time.perf_counter() - t0
    return res


_POOL_LAUNCHES: list = []


def _compile_index(job: tuple[int, int]) -> Result:
    return compile_launch(_POOL_LAUNCHES[job[0]], job[1])


def compile_all(launches: list[Launch], archs: Iterable[int], jobs: int = 0,
                progress: Callable[[str], None] | None = None) -> list[Result]:
    """Compile each distinct specialisation once per arch (``jobs`` processes; 0 = one per
    core); a result lists every case that produced it and the largest grid it ran with."""
    results: list[Result] = []
    todo: list[tuple[int, int]] = []
    groups: list[tuple[list[str], tuple, bool]] = []
    for arch in archs:
        seen: dict[str, int] = {}
        for i, launch in enumerate(launches):
            try:
                key = _key(launch, arch)
            except Exception as e:  # noqa: BLE001 -- binding failed: report it like a compile error
                results.append(Result(launch.name, [launch.case], arch, launch.grid,
                                      error=f"{type(e).__name__}: {e}"))
                continue
            if key in seen:
                cases_, grid, unguarded = groups[seen[key]]
                if launch.case not in cases_:
                    cases_.append(launch.case)
                groups[seen[key]] = (cases_, tuple(max(a, b) for a, b in zip(grid, launch.grid)),
                                     unguarded or not launch.guarded)
                continue
            seen[key] = len(todo)
            todo.append((i, arch))
            groups.append(([launch.case], launch.grid, not launch.guarded))
    jobs = jobs or os.cpu_count() or 1
    # Forked workers inherit the recorded launches (tensors and kernels do not pickle).
    _POOL_LAUNCHES[:] = launches
    try:
        if jobs > 1 and len(todo) > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                compiled = [_report(r, g, progress)
                            for r, g in zip(pool.imap(_compile_index, todo), groups)]
        else:
            compiled = [_report(_compile_index(job), g, progress) for job, g in zip(todo, groups)]
    finally:
        _POOL_LAUNCHES.clear()
    return results + compiled


def _report(r: Result, group: tuple[list[str], tuple, bool],
            progress: Callable[[str], None] | None) -> Result:
    r.cases, r.grid, r.unguarded = group
    if progress is not None:
        progress(format_row(r))
    return r


# --------------------------------------------------------------------------------------------
# Cases: the ops at the test suite's shapes and the papers' shapes

@dataclasses.dataclass
class Case:
    op: str
    label: str
    run: Callable[[], None]
    paper: bool = False     # a papers' shape: spills are reported as failures there


def _rand(*shape, dtype=torch.float32, grad=True):
    x = torch.randn(*shape).to(dtype)
    return x.requires_grad_(grad)


def _backward(*outs):
    loss = sum(o.float().sum() for o in outs)
    loss.backward()


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cases(ops: Iterable[str] | None = None) -> list[Case]:
    """Every case, or those of ``ops``."""
    import tvr_kernels as tk

    out: list[Case] = []

    def add(op, label, fn, paper=False):
        out.append(Case(op, f"{op} {label}", fn, paper))

    for dt in DTYPES:
        n = _dt(dt)
        # token shift: ViT-B/32 and ViT-B/16 (T = 12), and a small odd shape
        for shape, T, paper in (((192, 50, 768), 12, True), ((48, 197, 768), 12, True),
                                ((6, 9, 7), 3, False)):
            def ts(shape=shape, T=T, dt=dt):
                _backward(tk.token_shift(_rand(*shape, dtype=dt), num_frames=T))
            add("token_shift", f"{list(shape)} T={T} {n}", ts, paper)

        # perturbed top-K: TS2-Net/UCoFiA [192, 49] k=3 S=500; small; both distributions,
        # each seed, injected noise, hard; both gradient estimators (the forward launches
        # are the same specialisations for both, so only the full backward adds compiles).
        for (b, d, k, S), paper in (((192, 49, 3, 500), True), ((3, 10, 2, 8), False)):
            for dist, grad in (("normal", "diagonal"), ("gumbel", "diagonal"), ("normal", "full"),
                               ("gumbel", "full")):
                for seed in SEEDS:
                    def tk_seed(b=b, d=d, k=k, S=S, dist=dist, seed=seed, dt=dt, grad=grad):
                        _backward(tk.perturbed_topk(_rand(b, d, dtype=dt), k, S, seed=seed,
                                                    distribution=dist, gradient=grad))
                    add("perturbed_topk", f"[{b},{d}] k={k} S={S} {dist} {grad} seed={seed} {n}",
                        tk_seed, paper)

            for grad in ("diagonal", "full"):
                def tk_noise(b=b, d=d, k=k, S=S, dt=dt, grad=grad):
                    _backward(tk.perturbed_topk(_rand(b, d, dtype=dt), k, S,
                                                noise=torch.randn(b, S, d), gradient=grad))
                add("perturbed_topk", f"[{b},{d}] k={k} S={S} noise {grad} {n}", tk_noise, paper)

            def tk_hard(b=b, d=d, k=k, dt=dt):
                tk.perturbed_topk(_rand(b, d, dtype=dt, grad=False), k, hard=True)
            add("perturbed_topk", f"[{b},{d}] k={k} hard {n}", tk_hard, paper)

        # ISA: UCoFiA's frame (12), patch (48) and ViT-B/16 patch (196) axes; small odd axes
        for shape, paper in (((1000, 1000, 12), True), ((64, 64, 48), True), ((8, 196), True),
                             ((5, 7, 3), False), ((4, 1), False), ((3, 33), False)):
            def isa(shape=shape, dt=dt):
                m = shape[-1]
                _backward(tk.isa(_rand(*shape, dtype=dt), _rand(m, m, dtype=dt), dim=-1))
            add("isa", f"{list(shape)} {n}", isa, paper)

        # Bi-ISA: training 64x64 and evaluation 1000x1000 (L=32, P=48, D=512); small odd
        for (Bt, Bv, L, P, D), paper, grad in (((64, 64, 32, 48, 512), True, True),
                                               ((1000, 1000, 32, 48, 512), True, False),
                                               ((3, 2, 5, 7, 9), False, True)):
            def bi(Bt=Bt, Bv=Bv, L=L, P=P, D=D, dt=dt, grad=grad):
                ws = [_rand(x, x, dtype=dt, grad=grad) for x in (L, P, L, P)]
                y = tk.bi_isa(_rand(Bt, L, D, dtype=dt, grad=grad),
                              _rand(Bv, P, D, dtype=dt, grad=grad), *ws)
                if grad:
                    _backward(y)
            add("bi_isa", f"{Bt}x{Bv} L={L} P={P} D={D} {'fwd+bwd' if grad else 'fwd'} {n}",
                bi, paper)

        # Sinkhorn: UCoFiA's bank [45000, 1000] x 4 iterations; small odd; both domains
        for (Nq, Nv), paper in (((45000, 1000), True), ((7, 9), False), ((1, 5), False)):
            for log_domain in (False, True):
                def sk(Nq=Nq, Nv=Nv, log_domain=log_domain, dt=dt):
                    _backward(*tk.sinkhorn_knopp(_rand(Nq, Nv, dtype=dt), 4,
                                                 log_domain=log_domain))
                add("sinkhorn_knopp", f"[{Nq},{Nv}] {'log' if log_domain else 'prob'} {n}",
                    sk, paper)

        # T-MASS: 128 x 128, T = 12, D = 512, M = 20; small odd; priors, seeds, noise
        for (Nt, Nv, T, D, M), paper in (((128, 128, 12, 512, 20), True), ((3, 4, 5, 9, 3), False)):
            for prior in ("uniform", "normal"):
                for seed in SEEDS:
                    def sm(Nt=Nt, Nv=Nv, T=T, D=D, M=M, prior=prior, seed=seed, dt=dt):
                        sims, _ = tk.stochastic_max_similarity(
                            _rand(Nt, D, dtype=dt), _rand(Nv, T, D, dtype=dt),
                            _rand(Nv, Nt, D, dtype=dt), _rand(D, T, dtype=dt),
                            _rand(D, dtype=dt), M, prior=prior, seed=seed)
                        _backward(sims)
                    add("stochastic_max_similarity",
                        f"{Nt}x{Nv} T={T} D={D} M={M} {prior} seed={seed} {n}", sm, paper)

            def sm_noise(Nt=Nt, Nv=Nv, T=T, D=D, M=M, dt=dt):
                sims, _ = tk.stochastic_max_similarity(
                    _rand(Nt, D, dtype=dt), _rand(Nv, T, D, dtype=dt), _rand(Nv, Nt, D, dtype=dt),
                    _rand(D, T, dtype=dt), _rand(D, dtype=dt), M,
                    noise=torch.rand(Nt, Nv, M, D).to(dt))
                _backward(sims)
            if Nt * Nv * M * D <= 1 << 16:  # injected noise is a small-test feature
                add("stochastic_max_similarity", f"{Nt}x{Nv} T={T} D={D} M={M} noise {n}",
                    sm_noise, paper)

    for seed in SEEDS:  # the Philox test hook (bit-equality tests run it)
        def ph(seed=seed):
            from .triton.philox import philox
            philox(torch.randint(0, 2 ** 32, (37, 4), dtype=torch.int64), seed)
        add("philox", f"seed={seed}", ph)

    if ops:
        wanted = set(ops)
        unknown = wanted - {c.op for c in out}
        if unknown:
            raise ValueError(f"unknown op(s) {sorted(unknown)}; known: "
                             f"{sorted({c.op for c in out})}")
        out = [c for c in out if c.op in wanted]
    return out


def package_kernels() -> set[str]:
    """Names of every ``@triton.jit`` kernel (``*_kernel``) in ``tvr_kernels.triton``."""
    from triton.runtime.jit import JITFunction

    from . import triton as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return names


# --------------------------------------------------------------------------------------------
# Report

HEADER = (f"{'kernel':<32} {'arch':>5} {'warps':>5} {'regs':>4} {'spill st/ld B':>13} "
          f"{'smem KiB':>8} {'grid':>18}  status  case(s)")


def format_row(r: Result) -> str:
    spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
    smem = "-" if r.smem is None else f"{r.smem / 1024:.1f}"
    status = ("FAIL" if r.error else "SMEM" if not r.smem_ok else "GRID" if not r.grid_ok
              else "GUARD" if r.unguarded else "spill" if r.spills else "ok")
    more = f" (+{len(r.cases) - 1} more)" if len(r.cases) > 1 else ""
    line = (f"{r.kernel:<32} sm_{r.arch:<2} {r.num_warps or '-':>5} {r.regs or '-':>4} "
            f"{spill:>13} {smem:>8} {str(r.grid):>18}  {status:<6}  {r.cases[0]}{more}")
    if r.error:
        line += "\n    " + r.error.strip().splitlines()[0][:300]
    return line


def documented_spill(doc: str, cases_: list[str]) -> bool:
    """True when the kernel's docstring gives the reason for spilling in the dtype of these
    cases: a sentence naming both the dtype and "spill" (e.g. "float64 doubles every tile
    and spills ~50 B past the 255-register cap")."""
    dtypes = {c.rsplit(" ", 1)[-1] for c in cases_} & {_dt(d) for d in DTYPES}
    sentences = re.split(r"(?<=[.;])\s+", " ".join(doc.split()))
    return bool(dtypes) and all(any(d in s and "spill" in s for s in sentences) for d in dtypes)


def parse_archs(spec: str) -> list[int]:
    archs = []
    for part in spec.split(","):
        m = re.fullmatch(r"(?:sm_?)?(\d+)", part.strip())
        if not m:
            raise ValueError(f"--compile takes sm_80,sm_90 style targets, got {part!r}")
        archs.append(int(m.group(1)))
    return archs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvr_kernels.compile_check",
                                 description="Compile every Triton launch of the ops for a GPU "
                                             "target (no GPU needed) and report registers, "
                                             "spills and shared memory.")
    ap.add_argument("--arch", "--compile", dest="arch", default="sm_80,sm_90")
    ap.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--paper-only", action="store_true", help="only the papers' shapes")
    args = ap.parse_args(argv)
    return run_report(parse_archs(args.arch), [o for o in args.ops.split(",") if o],
                      args.paper_only)


def run_report(archs: list[int], ops: list[str], paper_only: bool = False) -> int:
    """Capture, compile and print; returns 1 when anything failed (compile error, shared
    memory or grid over the limit, or spills at a papers' shape), else 0."""
    import triton

    selected = [c for c in cases(ops) if c.paper or not paper_only]
    paper = {c.label for c in selected if c.paper}
    print(f"tvr_kernels compile check: triton {triton.__version__}, torch {torch.__version__}, "
          f"targets {', '.join(f'sm_{a}' for a in archs)}, {len(selected)} cases", flush=True)
    t0 = time.perf_counter()
    launches = capture(selected)
    print(f"{len(launches)} launches recorded in {time.perf_counter() - t0:.1f} s", flush=True)
    print(HEADER, flush=True)
    results = compile_all(launches, archs, progress=lambda s: print(s, flush=True))
    failed = [r for r in results if not r.ok]
    docs = {launch.name: launch.kernel.fn.__doc__ or "" for launch in launches}
    at_paper = [r for r in results if r.spills and any(c in paper for c in r.cases)]
    spilled = [r for r in at_paper if not documented_spill(docs.get(r.kernel, ""), r.cases)]
    print(f"\n{len(results)} kernel specialisations compiled in {time.perf_counter() - t0:.0f} s: "
          f"{len(failed)} failed (compile error, shared memory or grid over the limit, or "
          f"launched outside device_guard), "
          f"{len(spilled)} spill registers at a papers' shape", flush=True)
    for r in at_paper:
        tag = "NOT documented" if r in spilled else "reason in the kernel's docstring"
        print(f"  spills at a papers' shape ({tag}): {r.kernel} sm_{r.arch} "
              f"{r.spill_stores}/{r.spill_loads} B, {r.cases[0]}", flush=True)
    if not ops:
        missing = package_kernels() - {launch.name for launch in launches}
        if missing:
            print(f"kernels no case launched: {sorted(missing)}", flush=True)
            return 1
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
