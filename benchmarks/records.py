"""The benchmark records: ``benchmarks/results/*.csv``, one row per (case, mode, provider)
measurement, keyed by the conditions it was measured under.

Key columns: ``date``, ``commit`` (of the tree measured; ``-dirty`` when it had uncommitted
changes), ``device``, ``torch``, ``triton``, ``threads``. ``ref_commit`` is the last commit
that changed what a reference provider runs (its op's reference module, the bench module and
the case's ``reference_sources``): a minutes-long reference figure recorded under one
``ref_commit`` stays valid, and is reused by the default run, until that code changes.
``source`` is ``measured`` for every row written; a run that reuses a recorded figure prints
it marked ``recorded <commit> <date>`` and does not write it again. ``wall_s`` is what the
measurement's process took, start-up included: the next run's time estimate.
"""
from __future__ import annotations

import csv
import functools
import pathlib
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
RESULTS = RESULTS_DIR / "results.csv"
FIELDS = ["date", "commit", "device", "torch", "triton", "threads", "op", "case", "mode", "provider",
          "median_ms", "p20_ms", "p80_ms", "peak_mb", "gbps", "fraction_of_copy",
          "speedup_vs_reference", "speedup_vs_compile", "memory_vs_reference", "source",
          "ref_commit", "wall_s"]
# Providers that are not the library: their rows give the speedups' denominators.
REFERENCES = ("reference", "reference_ftz", "compile")


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def _last_commit(paths: tuple[str, ...]) -> str:
    existing = [p for p in paths if (ROOT / p).exists()]
    commit = _git("log", "-1", "--format=%h", "--", *existing) if existing else None
    if not commit:
        return "unknown"
    return commit + ("-dirty" if _git("status", "--porcelain", "--", *existing) else "")


def commit() -> str:
    """The checked-out commit (``-dirty`` with uncommitted changes to tracked files)."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def reference_commit(case, module: str) -> str:
    """The last commit that changed what ``case``'s reference providers run ("unknown" outside
    git, ``-dirty`` with uncommitted changes there: then nothing recorded matches)."""
    paths = (f"tvr_kernels/reference/{case.op}.py", f"benchmarks/{module}.py", *case.reference_sources)
    return _last_commit(paths)


def read(path: pathlib.Path | str = RESULTS) -> list[dict]:
    """Every row of a results CSV as a dict over FIELDS (columns an older file lacks are '')."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: (row.get(k) or "") for k in FIELDS} for row in csv.DictReader(f)]


def append(rows: list[dict], path: pathlib.Path | str = RESULTS) -> None:
    """Append rows; a file with an older header is rewritten once under the current one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = None
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
    if header is not None and header != FIELDS:
        old = read(path)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(old)
        header = FIELDS
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if header is None:
            w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in FIELDS})


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def number(row: dict, key: str) -> float | None:
    try:
        v = float(row[key])
    except (KeyError, TypeError, ValueError):
        return None
    return None if v != v else v


def recorded(rows: list[dict], *, device: str, threads: int, op: str, case: str, mode: str,
             provider: str, ref_commit: str) -> dict | None:
    """The latest measured row of this provider under the same device, thread count and
    reference commit, or None ("unknown" and "-dirty" reference commits never match)."""
    if ref_commit == "unknown" or ref_commit.endswith("-dirty"):
        return None
    for row in reversed(rows):
        if (row["device"] == device and row["threads"] == str(threads) and row["op"] == op
                and row["case"] == case and row["mode"] == mode and row["provider"] == provider
                and row["ref_commit"] == ref_commit and row["source"] in ("", "measured")):
            return row
    return None


def expected_wall_s(rows: list[dict], *, device: str, op: str, case: str, mode: str,
                    provider: str) -> float | None:
    """What this measurement's process took the last time on this device (for the ETA)."""
    for row in reversed(rows):
        if (row["device"] == device and row["op"] == op and row["case"] == case
                and row["mode"] == mode and row["provider"] == provider):
            w = number(row, "wall_s")
            if w is not None:
                return w
    return None
