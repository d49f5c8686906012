"""Speedup and memory charts from the records (matplotlib, PNG, log scale).

    python -m benchmarks.plot [--csv PATH] [--device NAME] [--out DIR]

Draws ``speedup-<device>.png`` (each provider's speedup over the eager reference, one bar
group per op, case and mode) and ``memory-<device>.png`` (peak memory above the inputs per
provider) into ``benchmarks/results/``, from the same rows as ``python -m benchmarks.report``
(the latest of each provider on the device), device and commits in the title.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

from benchmarks import records
from benchmarks.report import FUSED, default_device, select

SPEEDUP_PROVIDERS = ("reference_ftz", "compile", *FUSED)
MEMORY_PROVIDERS = ("reference", "compile", *FUSED)
MEMORY_FLOOR_MIB = 0.01   # a log axis has no 0: smaller peaks are drawn at this floor


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _label(g) -> str:
    case = g.case if len(g.case) <= 28 else g.case[:27] + "…"
    return f"{g.op}\n{case}\n{g.mode}"


def _bars(ax, groups, providers, value, ylabel):
    import numpy as np

    present = [p for p in providers if any(value(g, p) is not None for g in groups)]
    width = 0.8 / max(1, len(present))
    x = np.arange(len(groups))
    for i, p in enumerate(present):
        ys = [value(g, p) for g in groups]
        ax.bar(x + (i - (len(present) - 1) / 2) * width, [y if y is not None else 0 for y in ys],
               width, label=p)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xticks(x, [_label(g) for g in groups], rotation=90, fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)


def draw(rows: list[dict], device: str, out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = select(rows, device)
    if not groups:
        raise SystemExit(f"no records for device {device!r}")
    commits = ", ".join(sorted({r["commit"] for g in groups for r in g.rows.values()}))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def speedup(g, p):
        ref, m = g.median("reference"), g.median(p)
        return ref / m if ref and m and p in g.rows else None

    def memory(g, p):
        v = records.number(g.rows[p], "peak_mb") if p in g.rows else None
        return None if v is None else max(v, MEMORY_FLOOR_MIB)

    for name, providers, value, ylabel, ref_line in (
            ("speedup", SPEEDUP_PROVIDERS, speedup, "speedup over the eager reference (x)", 1.0),
            ("memory", MEMORY_PROVIDERS, memory,
             f"peak memory above the inputs (MiB; < {MEMORY_FLOOR_MIB} drawn at it)", None)):
        fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(groups)), 6.5))
        _bars(ax, groups, providers, value, ylabel)
        if ref_line:
            ax.axhline(ref_line, color="black", linewidth=0.8)
        ax.set_title(f"tvr-kernels {name}: {device}\ncommits {commits}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{name}-{slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(records.RESULTS))
    ap.add_argument("--device", default=None, help="device name as in the CSV (default: its last row's)")
    ap.add_argument("--out", default=str(records.RESULTS_DIR))
    args = ap.parse_args(argv)
    rows = records.read(args.csv)
    device = args.device or default_device(rows)
    if device is None:
        print(f"no records in {args.csv}: run `make bench` first", file=sys.stderr)
        return 1
    for path in draw(rows, device, pathlib.Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
