"""Backend selection, the pure-Python fallback, the info command, and the CUDA sources."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import tvr_kernels as tk
from tvr_kernels import _backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with tk.use_backend("nope"):
            pass


def test_unavailable_backend_raises_clearly():
    if torch.cuda.is_available():
        pytest.skip("cuda present")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        with tk.use_backend("cuda"):
            pass


def test_default_cpu_backend_is_cpp_when_built():
    want = "cpp" if _backend.extension_available() else "reference"
    assert _backend.resolve("token_shift", torch.device("cpu"), "", _backend.BACKENDS) == want


def test_use_backend_nests_and_restores():
    assert _backend.requested_backend() == ""
    with tk.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with tk.use_backend("cpp" if _backend.extension_available() else "reference"):
            pass
        assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == ""


def test_use_backend_is_per_thread():
    """Two threads in their own blocks: leaving one block must not change the other thread's
    backend (each exit removes its own entry), and neither block leaks into a third thread."""
    import threading

    # Order: b enters, a enters, b leaves while a is still inside (a process-wide stack would
    # then pop a's entry, not b's).
    b_in, a_in, b_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        b_in.wait(timeout=10)
        with tk.use_backend("reference"):
            a_in.set()
            b_left.wait(timeout=10)
            seen["a_after_b_left"] = _backend.requested_backend()
            x = torch.randn(2 * 3, 9, 5)
            seen["a_op"] = torch.equal(tk.token_shift(x, 3), tk.reference.token_shift(x, 3))
        seen["a_after"] = _backend.requested_backend()

    def b():
        with tk.use_backend("cpp" if _backend.extension_available() else "reference"):
            b_in.set()
            a_in.wait(timeout=10)
            seen["b_inside"] = _backend.requested_backend()
        seen["b_after"] = _backend.requested_backend()
        b_left.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen["a_after_b_left"] == "reference"
    assert seen["b_inside"] in ("cpp", "reference") and seen["b_after"] == ""
    assert seen["a_after"] == "" and seen["a_op"]
    assert _backend.requested_backend() == ""


def test_accelerator_fallback_to_reference_warns_once(monkeypatch):
    """A non-CPU tensor no fused backend handles runs the reference, with one warning per op
    (resolve is called with a device only: nothing runs on it)."""
    monkeypatch.setattr(_backend, "_fallback_warned", set())
    meta = torch.device("meta")
    with pytest.warns(RuntimeWarning, match="tvr::token_shift on meta tensors runs the eager"):
        assert _backend.resolve("token_shift", meta, "", _backend.BACKENDS) == "reference"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("token_shift", meta, "", _backend.BACKENDS) == "reference"
    # a CUDA device without triton
    monkeypatch.setattr(_backend, "triton_importable", lambda: False)
    monkeypatch.setattr(_backend, "extension_has_cuda", lambda op="": False)
    with pytest.warns(RuntimeWarning, match="isa on cuda tensors .*triton is not importable"):
        assert _backend.resolve("isa", torch.device("cuda"), "", _backend.BACKENDS) == "reference"


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "tvr_kernels.info"], capture_output=True, text=True,
                         check=True).stdout
    assert "C++ extension tvr_kernels._C built" in out and "usable backends" in out


def test_pure_python_fallback_warns_once_and_works():
    """A pure-Python install (simulated: the extension is hidden) still imports, and every op
    computes what its reference computes."""
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import tvr_kernels as tk\n"
        "    import tvr_kernels.reference as ref\n"
        "x = torch.randn(6, 13, 4, requires_grad=True)\n"
        "y = tk.token_shift(x, 3)\n"
        "y.sum().backward()\n"
        "assert torch.equal(y, ref.token_shift(x, 3))\n"
        "s = torch.randn(4, 9)\n"
        "assert torch.equal(tk.perturbed_topk(s, 2, 16, seed=1), ref.perturbed_topk(s, 2, 16, seed=1))\n"
        "v, wt = torch.randn(3, 5, 7), torch.randn(7, 7)\n"
        "assert torch.equal(tk.isa(v, wt), ref.isa(v, wt))\n"
        "W = [torch.randn(n, n) for n in (4, 5, 4, 5)]\n"
        "a, b = torch.randn(2, 4, 6), torch.randn(3, 5, 6)\n"
        "assert torch.equal(tk.bi_isa(a, b, *W), ref.bi_isa(a, b, *W))\n"
        "l = torch.randn(6, 5)\n"
        "assert all(torch.equal(p, q) for p, q in zip(tk.sinkhorn_knopp(l), ref.sinkhorn_knopp(l)))\n"
        "t, f, p, rw, rb = torch.randn(3, 8), torch.randn(4, 2, 8), torch.randn(4, 3, 8), torch.randn(8, 2), torch.randn(8)\n"
        "got = tk.stochastic_max_similarity(t, f, p, rw, rb, 5, seed=3)\n"
        "want = ref.stochastic_max_similarity(t, f, p, rw, rb, 5, seed=3)\n"
        "assert all(torch.equal(p, q) for p, q in zip(got, want))\n"
        "msgs = [str(m.message) for m in w if 'not available' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(tk.available_backends())\n"
    )
    env = dict(os.environ, TVR_KERNELS_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cpp" not in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    """Each csrc/cuda/*.cu needs only the CUDA runtime and csrc/include: compile-check it."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    for src in sources:
        cmd = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", f"-I{ROOT / 'csrc' / 'include'}",
               str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{src.name}:\n{res.stderr}"
