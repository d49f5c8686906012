"""Run the benchmark suite at its default shapes and print a table (the README's main job).

    python -m benchmarks.run [--ops token_shift,perturbed_topk] [--providers cpp,reference]
                             [--no-compile] [--min-time 1.0] [--device cpu|cuda]

Every case is declared in ``benchmarks/bench_<op>.py`` (``CASES``). Each measurement runs in
a fresh process (see benchmarks/common.py); results are appended to
``benchmarks/results/results.csv`` keyed by device, date and commit.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "results.csv"
FIELDS = ["date", "commit", "device", "op", "case", "mode", "provider", "median_ms", "p20_ms",
          "p80_ms", "peak_mb", "speedup_vs_reference", "speedup_vs_compile", "memory_vs_reference"]


def bench_modules() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def load_cases(module: str):
    return importlib.import_module(f"benchmarks.{module}").CASES


def _worker(module: str, index: int, mode: str, provider: str, device: str, min_time: float) -> None:
    from benchmarks.common import measure

    case = load_cases(module)[index]
    print("RESULT " + json.dumps(measure(case, mode, provider, device, min_time=min_time)))


def _providers(case, device: str, allow_compile: bool) -> list[str]:
    from tvr_kernels import _backend

    out = ["reference"]
    if case.denormals and device == "cpu":
        out.append("reference_ftz")
    if case.compile_reference and allow_compile:
        out.append("compile")
    for b in case.backends:
        if _backend._why_unavailable(b) is not None:
            continue
        if (b == "cpp" and device != "cpu") or (b in ("cuda", "triton") and device != "cuda"):
            continue  # the Triton interpreter is a test vehicle, not a benchmark
        out.append(b)
    return out + list(case.baselines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(v, spec=".2f"):
    return "-" if v is None or v != v else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--providers", default="", help="comma-separated providers (default: all available)")
    ap.add_argument("--modes", default="", help="comma-separated modes (default: each case's)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--csv", default=str(RESULTS), help="CSV to append to ('' for none)")
    ap.add_argument("--worker", nargs=4, metavar=("MODULE", "INDEX", "MODE", "PROVIDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        m, i, mode, prov = args.worker
        _worker(m, int(i), mode, prov, device, args.min_time)
        return 0

    from benchmarks.common import device_name

    ops = set(filter(None, args.ops.split(",")))
    want_prov = set(filter(None, args.providers.split(",")))
    want_modes = set(filter(None, args.modes.split(",")))
    dev_name = device_name(device)
    date = datetime.date.today().isoformat()
    commit = _commit()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    rows = []
    print(f"device: {dev_name}   torch {torch.__version__}   commit {commit}   {date}", flush=True)
    for module in bench_modules():
        for index, case in enumerate(load_cases(module)):
            if ops and case.op not in ops:
                continue
            for mode in case.modes:
                if want_modes and mode not in want_modes:
                    continue
                results = {}
                for prov in _providers(case, device, not args.no_compile):
                    if want_prov and prov not in want_prov:
                        continue
                    cmd = [sys.executable, "-m", "benchmarks.run", "--device", device, "--min-time",
                           str(args.min_time), "--worker", module, str(index), mode, prov]
                    res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                         cwd=HERE.parent)
                    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
                    if res.returncode != 0 or not line:
                        err = (res.stderr.strip().splitlines() or ["?"])[-1]
                        print(f"  {case.op} {case.name} {mode} {prov}: FAILED ({err})", flush=True)
                        continue
                    results[prov] = json.loads(line[0][7:])
                ref = results.get("reference")
                comp = results.get("compile")
                for prov, r in results.items():
                    row = dict(date=date, commit=commit, device=dev_name, op=case.op, case=case.name,
                               mode=mode, provider=prov, median_ms=r["median_ms"], p20_ms=r["p20_ms"],
                               p80_ms=r["p80_ms"], peak_mb=r["peak_mb"],
                               speedup_vs_reference=(ref["median_ms"] / r["median_ms"]) if ref else None,
                               speedup_vs_compile=(comp["median_ms"] / r["median_ms"]) if comp else None,
                               memory_vs_reference=(ref["peak_mb"] / r["peak_mb"])
                               if ref and r["peak_mb"] and r["peak_mb"] > 0 else None)
                    rows.append(row)
                    print(f"  {case.op:<26} {case.name:<34} {mode:<8} {prov:<10} "
                          f"{_fmt(r['median_ms'], '9.3f')} ms  x{_fmt(row['speedup_vs_reference'], '6.2f')} ref  "
                          f"x{_fmt(row['speedup_vs_compile'], '6.2f')} compile  peak {_fmt(r['peak_mb'], '8.1f')} MiB",
                          flush=True)
    if args.csv and rows:
        path = pathlib.Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
