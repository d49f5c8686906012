"""The benchmark harness (benchmarks/): every suite module declares loadable cases, and one
worker measurement of a small case runs end to end for each kind of provider. The timings
themselves are never asserted (speed is checked by running the benchmarks, not by tests)."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, plot, records, report, run  # noqa: E402

MODEL_STAGES = {"ts2net_eval_scoring", "ucofia_eval_scoring", "tmass_eval_scoring", "tokenbinder_eval"}
OPS = {"token_shift", "perturbed_topk", "isa", "bi_isa", "sinkhorn_knopp", "stochastic_max_similarity"}


def test_every_suite_module_declares_cases():
    ops = set()
    for module in run.bench_modules():
        cases = run.load_cases(module)
        assert cases, module
        for case in cases:
            assert isinstance(case, common.Case)
            assert set(case.modes) <= set(common.MODES), (module, case.name)
            assert set(case.grad_args) or case.modes == ("fwd",), (module, case.name)
            ops.add(case.op)
    # Every op of the package and every model's evaluation stage is benchmarked.
    assert OPS | MODEL_STAGES <= ops


@pytest.mark.parametrize("shapes", ["small", "paper"])
def test_every_op_and_model_stage_in_each_shape_set(shapes):
    items = run.plan(shapes, "cpu")
    assert OPS | MODEL_STAGES <= {i.case.op for i in items}
    if shapes == "paper":
        # The default run never measures a heavy provider: it takes the recorded figure.
        heavy = [i for i in items if i.provider in i.case.heavy]
        assert heavy and all(i.reuse for i in heavy)
        assert all(not i.reuse for i in items if i.provider not in i.case.heavy)
        assert {i.case.name for i in items if i.case.op == "stochastic_max_similarity"} >= {
            "1000x1000 T=12 D=512 M=20 f32"}


def test_large_runs_the_heavy_providers_and_small_runs_only_small_cases():
    large = run.plan("large", "cpu")
    assert not any(i.reuse for i in large)
    assert {i.provider for i in large if i.provider in i.case.heavy} >= {"reference", "all_pairs"}
    assert len(large) >= len(run.plan("paper", "cpu"))
    assert all("small" in i.case.shapes for i in run.plan("small", "cpu"))
    # Filters.
    only = run.plan("paper", "cpu", ops=("token_shift",), backends=("copy",), modes=("bwd",))
    assert [(i.case.op, i.mode, i.provider) for i in only] == [("token_shift", "bwd", "copy")]


def _row(**kw):
    base = dict(date="2026-11-30", commit="abc1234", device="cpu X", torch="2.13.0", triton="3.7.1",
                threads="2", op="isa", case="c", mode="fwd", provider="reference", median_ms="100.0",
                p20_ms="90.0", p80_ms="110.0", peak_mb="10.0", source="measured", ref_commit="r1",
                wall_s="5.0")
    base.update(kw)
    return base


def test_records_append_migrates_an_old_header_and_recorded_matches_conditions(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("date,commit,device,op,case,mode,provider,median_ms\n"
                    "2026-11-23,old,cpu X,isa,c,fwd,cpp,9.0\n")
    records.append([_row(), _row(median_ms="50.0", threads="1")], path)
    rows = records.read(path)
    assert path.read_text().splitlines()[0].split(",") == records.FIELDS
    assert [r["median_ms"] for r in rows] == ["9.0", "100.0", "50.0"] and rows[0]["torch"] == ""
    key = dict(device="cpu X", op="isa", case="c", mode="fwd", provider="reference")
    assert records.recorded(rows, threads=2, ref_commit="r1", **key)["median_ms"] == "100.0"
    assert records.recorded(rows, threads=1, ref_commit="r1", **key)["median_ms"] == "50.0"
    assert records.recorded(rows, threads=2, ref_commit="r2", **key) is None        # code changed
    assert records.recorded(rows, threads=2, ref_commit="r1-dirty", **key) is None  # uncommitted
    assert records.recorded(rows, threads=4, ref_commit="r1", **key) is None
    assert records.recorded(rows, threads=2, ref_commit="r1", **{**key, "device": "gpu"}) is None
    assert records.expected_wall_s(rows, **key) == 5.0


def test_default_run_reuses_a_recorded_heavy_figure_and_marks_it(tmp_path, capsys):
    case = run.load_cases("bench_isa")[0]
    path = tmp_path / "r.csv"
    import torch
    from benchmarks.common import device_name
    records.append([_row(device=device_name("cpu"), threads=str(torch.get_num_threads()), op=case.op,
                         case=case.name, median_ms="200.0", commit="feed123")], path)
    item = run.Item("bench_isa", 0, case, "fwd", "reference", "r1", reuse=True)
    missing = run.Item("bench_isa", 0, case, "fwd", "reference", "r2", reuse=True)
    args = run.argparse.Namespace(csv=str(path), shapes="paper", min_time=0.1, quick=True)
    assert run._run([item, missing], "cpu", args) == 0
    out = capsys.readouterr().out
    assert "200.000 ms" in out and "[recorded feed123 2026-11-30]" in out
    assert "not run (heavy; nothing recorded for reference commit r2" in out
    assert len(records.read(path)) == 1, "a reused figure is not written again"


def test_readme_table_is_what_the_report_script_gives():
    """The README's benchmark table is generated: regenerate it with
    `python -m benchmarks.report --write` after committing new records."""
    readme = (ROOT / "README.md").read_text()
    expected = report.render(records.read(records.RESULTS))
    assert report.BEGIN in readme and report.END in readme
    got = readme[readme.index(report.BEGIN):readme.index(report.END) + len(report.END)]
    assert got == expected


def test_report_of_rows_and_conditions(tmp_path):
    case = run.load_cases("bench_isa")[0]
    rows = [_row(op=case.op, case=case.name, provider=p, median_ms=m, commit=c)
            for p, m, c in (("reference", "100.0", "old0001"), ("compile", "40.0", "new0002"),
                            ("cpp", "4.0", "new0002"))]
    text = report.render(rows, "cpu X")
    line = [ln for ln in text.splitlines() if ln.startswith(f"| {case.op} | {case.name} | fwd |")]
    assert len(line) == 1
    cells = [c.strip() for c in line[0].strip("|").split("|")]
    assert cells[3:9] == ["100 ms", "-", "40 ms", "4 ms", "25x", "10x"]
    assert cells[-1] == "`new0002`, `old0001`"   # newest first: ours, then the recorded reference
    assert "cpu X" in text and "2 threads" in text and "torch 2.13.0" in text and "`old0001`" in text
    assert report.render([], None).count("No benchmark records") == 1


def test_plot_draws_both_charts(tmp_path):
    pytest.importorskip("matplotlib")
    rows = records.read(records.RESULTS)
    paths = plot.draw(rows, report.default_device(rows), tmp_path)
    assert [p.name.split("-")[0] for p in paths] == ["speedup", "memory"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_cli_list_and_a_quick_small_run(tmp_path):
    env = {k: v for k, v in run.os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--shapes paper:" in res.stdout and "reference*" in res.stdout
    csv_path = tmp_path / "r.csv"
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--shapes", "small", "--ops", "token_shift",
                          "--modes", "fwd", "--quick", "--csv", str(csv_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "left]" in res.stdout   # progress lines carry the time left
    rows = records.read(csv_path)
    assert {r["provider"] for r in rows} >= {"reference", "copy"}
    for r in rows:
        assert r["device"] and r["commit"] and r["torch"] and r["triton"] and r["threads"].isdigit()
        assert float(r["gbps"]) > 0 and r["source"] == "measured" and float(r["wall_s"]) > 0
    assert all(float(r["fraction_of_copy"]) > 0 for r in rows if r["provider"] != "reference")


def test_pytest_benchmark_entry_point(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = {k: v for k, v in run.os.environ.items() if k != "TRITON_INTERPRET"}
    base = [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider",
            f"--benchmark-storage=file://{tmp_path}"]
    every = subprocess.run(base + ["--benchmark-disable"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert every.returncode == 0, every.stdout[-3000:]
    one = ["--benchmark-only", "-k", "token_shift and fwd-reference", "--benchmark-max-time=0.01"]
    saved = subprocess.run(base + one + ["--benchmark-autosave"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
    assert saved.returncode == 0, saved.stdout[-3000:]
    compared = subprocess.run(base + one + ["--benchmark-compare"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)
    assert compared.returncode == 0, compared.stdout[-3000:]
    assert "NOW" in compared.stdout and "0001" in compared.stdout


# A small Bi-ISA measured by the real worker entry point, in its own process: the worker sets
# process-wide state (flush-to-zero for reference_ftz, glibc's mmap threshold).
_WORKER = """
import json, sys, torch
from benchmarks import common
import benchmarks.bench_isa as b
case = common.Case(op="bi_isa", name="tiny", make_inputs=b._bi_inputs(3, 2, L=5, P=7, D=16),
                   grad_args=b._BI_GRADS, warmup=1, min_reps=2, denormals=True)
mode, provider = sys.argv[1], sys.argv[2]
print("RESULT " + json.dumps(common.measure(case, mode, provider, "cpu", min_time=0.0)))
"""


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "bwd"])
@pytest.mark.parametrize("provider", ["reference", "reference_ftz", "cpp"])
def test_worker_measures_each_provider(mode, provider):
    if provider == "cpp":
        from tvr_kernels import _backend
        if _backend._why_unavailable("cpp") is not None:
            pytest.skip("C++ extension not built")
    res = subprocess.run([sys.executable, "-c", _WORKER, mode, provider], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**run.os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    r = json.loads(line[0][7:])
    assert r["reps"] >= 2 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert r["median_ms"] > 0 and r["peak_mb"] >= 0
