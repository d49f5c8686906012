"""The benchmark suite (``python -m benchmarks``; ``make bench`` runs its default).

    python -m benchmarks [--shapes paper|small|large] [--ops isa,bi_isa] [--backends cpp,reference]
                         [--modes fwd] [--device cpu|cuda] [--quick] [--no-compile]
                         [--min-time 0.5] [--csv PATH] [--list]

Cases are declared in ``benchmarks/bench_<op>.py`` (``CASES``, see ``benchmarks.common.Case``).
Shape sets: ``small`` (every op at a toy size, seconds), ``paper`` (default: every op and every
model's evaluation stage at the papers' shapes), ``large`` (``paper`` plus the providers marked
heavy, the eager references that take minutes per call at 1000 x 1000, and the large-only
cases). The default run reuses a heavy provider's last recorded figure for the same device,
thread count and reference commit (``benchmarks.records``), printed as ``recorded``.

Every measurement runs in a fresh process (peak memory is measured, not estimated: see
``benchmarks/common.py``); each prints a progress line with the time left, estimated from
what the same measurements took last time on this device. Measured rows are appended to
``benchmarks/results/results.csv``. ``--backends`` takes any provider names: ``reference``,
``reference_ftz``, ``compile``, ``cpp``, ``triton``, ``cuda``, ``copy`` and the cases' own
baselines. ``--quick``: no ``torch.compile``, 0.1 s and at most 5 timed calls per measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from benchmarks import records
from benchmarks.common import SkipCase, measure

HERE = pathlib.Path(__file__).resolve().parent
SHAPES = ("small", "paper", "large")
QUICK = dict(min_time=0.1, max_reps=5, min_reps=2)


def _measure_kwargs(quick: bool, min_time: float) -> dict:
    return dict(QUICK) if quick else {"min_time": min_time}


def bench_modules() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def load_cases(module: str):
    return importlib.import_module(f"benchmarks.{module}").CASES


def in_shape_set(case, shapes: str) -> bool:
    """Whether ``--shapes shapes`` runs ``case`` (``large`` runs the paper cases too)."""
    return shapes in case.shapes or (shapes == "large" and "paper" in case.shapes)


def _worker(module: str, index: int, mode: str, provider: str, device: str, min_time: float,
            quick: bool) -> None:
    case = load_cases(module)[index]
    kw = _measure_kwargs(quick, min_time)
    try:
        print("RESULT " + json.dumps(measure(case, mode, provider, device, **kw)))
    except SkipCase as e:
        print("SKIP " + str(e).replace("\n", " "))


def providers(case, device: str, allow_compile: bool) -> list[str]:
    """Every provider of ``case`` that can run on ``device`` here, references first."""
    from tvr_kernels import _backend

    out = ["reference"]
    if case.denormals and device == "cpu":
        out.append("reference_ftz")
    if case.compile_reference and allow_compile:
        out.append("compile")
    if case.traffic is not None:
        out.append("copy")   # before the fused backends: their rows give a fraction of it
    for b in case.backends:
        if _backend._why_unavailable(b) is not None:
            continue
        if (b == "cpp" and device != "cpu") or (b in ("cuda", "triton") and device != "cuda"):
            continue  # the Triton interpreter is a test vehicle, not a benchmark
        out.append(b)
    return out + list(case.baselines)


@dataclasses.dataclass
class Item:
    """One measurement of the plan: a provider of a case in a mode."""
    module: str
    index: int
    case: object
    mode: str
    provider: str
    ref_commit: str
    reuse: bool          # heavy provider outside --shapes large: take the recorded figure


def plan(shapes: str, device: str, *, ops=(), backends=(), modes=(), allow_compile=True) -> list[Item]:
    items = []
    for module in bench_modules():
        for index, case in enumerate(load_cases(module)):
            if (ops and case.op not in ops) or not in_shape_set(case, shapes):
                continue
            ref_commit = records.reference_commit(case, module)
            for mode in case.modes:
                if modes and mode not in modes:
                    continue
                for prov in providers(case, device, allow_compile):
                    if backends and prov not in backends:
                        continue
                    items.append(Item(module, index, case, mode, prov, ref_commit,
                                      reuse=prov in case.heavy and shapes != "large"))
    return items


def _fmt(v, spec=".2f"):
    return "-" if v is None or v != v else format(v, spec)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _measure(item: Item, device: str, min_time: float, quick: bool, env: dict) -> tuple[dict | None, str]:
    """One measurement in a fresh process: forked from this one on CPU (torch and the bench
    modules already imported: saves seconds of start-up per measurement, and this process
    never runs a torch op, so no thread pool is forked), a new interpreter on CUDA (a CUDA
    context cannot cross a fork; ``TVR_BENCH_SPAWN=1`` does the same on CPU)."""
    if device == "cpu" and hasattr(os, "fork") and not os.environ.get("TVR_BENCH_SPAWN"):
        return _measure_forked(item, min_time, quick)
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", device, "--min-time", str(min_time),
           "--worker", item.module, str(item.index), item.mode, item.provider]
    if quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    lines = res.stdout.splitlines()
    skip = [ln[5:] for ln in lines if ln.startswith("SKIP ")]
    if skip:
        return None, "skipped: " + skip[0]
    line = [ln for ln in lines if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        return None, (res.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(line[0][7:]), ""


def _measure_forked(item: Item, min_time: float, quick: bool) -> tuple[dict | None, str]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, send one JSON line, exit without running atexit hooks
        os.close(read_fd)
        code = 0
        try:
            import torch._inductor.config as inductor_config
            inductor_config.compile_threads = 1   # no compile-worker pool outliving the child
            kw = _measure_kwargs(quick, min_time)
            payload = {"result": measure(item.case, item.mode, item.provider, "cpu", **kw)}
        except SkipCase as e:
            payload = {"skip": str(e)}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            payload, code = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}, 1
        with os.fdopen(write_fd, "w") as f:
            f.write(json.dumps(payload))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return None, f"the measuring process died (wait status {status}: killed for memory?)"
    payload = json.loads(data)
    if "skip" in payload:
        return None, "skipped: " + payload["skip"]
    return payload.get("result"), payload.get("error", "")


def _list(items: list[Item], shapes: str) -> None:
    print(f"--shapes {shapes}: {len(items)} measurements (* heavy: recorded figure reused unless "
          f"--shapes large)")
    key = None
    for it in items:
        if (it.case.op, it.case.name, it.mode) != key:
            key = (it.case.op, it.case.name, it.mode)
            provs = [p + ("*" if p in it.case.heavy else "") for p in
                     (i.provider for i in items if (i.case.op, i.case.name, i.mode) == key)]
            print(f"  {it.case.op:<26} {it.case.name:<40} {it.mode:<8} {' '.join(provs)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=SHAPES, default="paper", help="shape set (default: paper)")
    ap.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--backends", "--providers", default="",
                    help="comma-separated providers (default: every one available)")
    ap.add_argument("--modes", default="", help="comma-separated modes (default: each case's)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--quick", action="store_true", help="no torch.compile, few timed calls")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per measurement")
    ap.add_argument("--csv", default=str(records.RESULTS), help="CSV to append to ('' for none)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--worker", nargs=4, metavar=("MODULE", "INDEX", "MODE", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available to this torch")
    if args.worker:
        m, i, mode, prov = args.worker
        _worker(m, int(i), mode, prov, device, args.min_time, args.quick)
        return 0

    split = lambda s: tuple(filter(None, s.split(",")))  # noqa: E731
    items = plan(args.shapes, device, ops=split(args.ops), backends=split(args.backends),
                 modes=split(args.modes), allow_compile=not (args.no_compile or args.quick))
    if args.list:
        _list(items, args.shapes)
        return 0
    if not items:
        print("nothing to run: see --list", file=sys.stderr)
        return 2
    return _run(items, device, args)


def _run(items: list[Item], device: str, args) -> int:
    import torch
    import triton

    from benchmarks.common import device_name

    dev_name = device_name(device)
    threads = torch.get_num_threads()
    cond = dict(date=datetime.date.today().isoformat(), commit=records.commit(), device=dev_name,
                torch=torch.__version__, triton=triton.__version__, threads=threads)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        # The forked children inherit malloc's settings: pin them now, as the environment
        # variables above do for a new interpreter (benchmarks/common.py says why).
        from benchmarks.common import pin_malloc
        pin_malloc()
        _preload(items)
    history = records.read(args.csv) if args.csv else records.read()
    print(f"device: {dev_name}, {threads} threads   torch {cond['torch']}   triton {cond['triton']}   "
          f"commit {cond['commit']}   {cond['date']}   --shapes {args.shapes}", flush=True)
    expected = [records.expected_wall_s(history, device=dev_name, op=i.case.op, case=i.case.name,
                                        mode=i.mode, provider=i.provider) if not i.reuse else 0.0
                for i in items]
    start = time.perf_counter()
    walls: list[float] = []
    rows: list[dict] = []
    failed = 0
    group: dict[str, dict] = {}
    for n, item in enumerate(items):
        if n == 0 or (items[n - 1].case, items[n - 1].mode) != (item.case, item.mode):
            group = {}
        key = dict(device=dev_name, op=item.case.op, case=item.case.name, mode=item.mode,
                   provider=item.provider)
        if item.reuse:
            old = records.recorded(history, threads=threads, ref_commit=item.ref_commit, **key)
            if old is None:
                print(f"[{n + 1}/{len(items)}] {_label(item)}: not run (heavy; nothing recorded for "
                      f"reference commit {item.ref_commit} on this device: --shapes large)", flush=True)
                continue
            r = {k: records.number(old, k) for k in ("median_ms", "p20_ms", "p80_ms", "peak_mb")}
            r["source"] = f"recorded {old['commit']} {old['date']}"
        else:
            t0 = time.perf_counter()
            r, err = _measure(item, device, args.min_time, args.quick, env)
            walls.append(time.perf_counter() - t0)
            if r is None:
                if err.startswith("skipped: "):
                    print(f"[{n + 1}/{len(items)}] {_label(item)}: {err}", flush=True)
                    continue
                failed += 1
                print(f"[{n + 1}/{len(items)}] {_label(item)}: FAILED ({err})", flush=True)
                continue
            r["source"] = "measured"
            r["wall_s"] = walls[-1]
        group[item.provider] = r
        row = _row(cond, item, r, group)
        if r["source"] == "measured":
            rows.append(row)
        print(f"[{n + 1}/{len(items)} {_duration(time.perf_counter() - start)}, "
              f"~{_duration(_left(expected, walls, n))} left] {_label(item)} "
              f"{_fmt(r['median_ms'], '.3f')} ms (p20 {_fmt(r['p20_ms'], '.3f')}, p80 {_fmt(r['p80_ms'], '.3f')})"
              f"  x{_fmt(row['speedup_vs_reference'])} ref  x{_fmt(row['speedup_vs_compile'])} compile"
              f"  peak {_fmt(r['peak_mb'], '.1f')} MiB"
              + (f"  {row['gbps']:.3g} GB/s" if row.get("gbps") else "")
              + (f" ({row['fraction_of_copy']:.2f} of copy)" if row.get("fraction_of_copy") else "")
              + ("" if r["source"] == "measured" else f"  [{r['source']}]"), flush=True)
    if args.csv and rows:
        records.append(rows, args.csv)
        print(f"appended {len(rows)} rows to {args.csv}; `python -m benchmarks.report --write` and "
              f"`python -m benchmarks.plot` update the README's table and charts")
    print(f"done in {_duration(time.perf_counter() - start)}" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


def _preload(items: list[Item]) -> None:
    """Import what the measurements import, once, before the first fork. Nothing here runs a
    torch op: the children start their own intra-op threads."""
    import torch._dynamo  # noqa: F401  (torch.compile's front end)
    import tvr_kernels.reference  # noqa: F401
    if any(i.case.reference_sources for i in items):
        import tvr_models.evaluate  # noqa: F401
        import tvr_models.tmass  # noqa: F401
        import tvr_models.tokenbinder  # noqa: F401


def _label(item: Item) -> str:
    return f"{item.case.op} {item.case.name} {item.mode} {item.provider}"


def _left(expected: list[float | None], walls: list[float], n: int) -> float:
    """Seconds left after item n: recorded wall times where known, else this run's median
    (robust to the one minute-long case among many short ones)."""
    typical = statistics.median(walls) if walls else 10.0
    return sum(typical if e is None else e for e in expected[n + 1:])


def _row(cond: dict, item: Item, r: dict, group: dict[str, dict]) -> dict:
    ref, comp, copy = group.get("reference"), group.get("compile"), group.get("copy")
    ratio = lambda a, b: (a / b) if a and b else None  # noqa: E731
    row = dict(cond, op=item.case.op, case=item.case.name, mode=item.mode, provider=item.provider,
               median_ms=r["median_ms"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"], peak_mb=r["peak_mb"],
               speedup_vs_reference=ratio(ref and ref["median_ms"], r["median_ms"]),
               speedup_vs_compile=ratio(comp and comp["median_ms"], r["median_ms"]),
               memory_vs_reference=ratio(ref and ref["peak_mb"], r["peak_mb"]),
               source=r["source"], ref_commit=item.ref_commit, wall_s=r.get("wall_s"))
    if r.get("bytes"):
        row["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        if copy and copy.get("bytes"):
            row["fraction_of_copy"] = row["gbps"] / (copy["bytes"] / (copy["median_ms"] * 1e-3) / 1e9)
    return row


if __name__ == "__main__":
    sys.exit(main())
