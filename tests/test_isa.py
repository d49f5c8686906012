"""isa and bi_isa (SPEC 3): every backend against the reference, forward and backward.

Inputs are random at realistic similarity scales (so the tau = 0.01 softmaxes are neither
one-hot nor uniform) plus cosine-range and raw-dot-product cases; weights are the identity
(the models' initialisation) plus a random perturbation, never the identity alone.
Tolerances: the fused result is compared with the float64 reference, within rtol (float32
1e-4, float64 1e-9) plus an absolute floor of rtol times the largest reference magnitude plus
4x the float32 reference's own error there. The floor is needed because tau = 0.01 makes some
outputs ill-conditioned: e.g. the second softmax is nearly one-hot (B lies in [0, 1], /tau),
so the weight gradient is a sum of cancelling O(1) terms and float32 rounding alone (of the
reference too) moves it by ~1e-6 while it is ~1e-4.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import tvr_kernels as tk
from tvr_kernels.reference import bi_isa as ref_bi_isa
from tvr_kernels.reference import isa as ref_isa

from conftest import DEVICES, fused_backends

RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _close(got, want, rtol, ref_err=0.0):
    """got ~ want (want: float64 truth), rtol plus a floor (see the module docstring)."""
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol,
                               atol=rtol * max(scale, 1e-6) + 4 * ref_err)


def _compare(got, ref_same_dtype, ref64, dtype):
    """Fused output vs the float64 reference, allowing the same-dtype reference's own error."""
    if dtype == torch.float64:  # no higher precision to measure against: a fixed 1e-13 floor
        ref_err = 1e-13
    else:
        ref_err = (ref_same_dtype.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    _close(got, ref64, RTOL[dtype], ref_err)


def _sims(*shape, kind, dtype, device="cpu"):
    """'clip': cosines of CLIP features (narrow band, spread ~0.03: tau = 0.01 softmaxes are
    peaked but not one-hot); 'cos': uniform in [-1, 1]; 'dot': raw dot products (~N(0, 9))."""
    if kind == "clip":
        x = 0.25 + 0.03 * torch.randn(*shape)
    elif kind == "cos":
        x = torch.rand(*shape) * 2 - 1
    else:
        x = 3 * torch.randn(*shape)
    return x.to(dtype=dtype, device=device)


def _weight(n, dtype, device="cpu", eps=0.02):
    return (torch.eye(n) + eps * torch.randn(n, n)).to(dtype=dtype, device=device)


def _features(Bt, Bv, L, P, D, kind, dtype, device="cpu"):
    """words, patches whose products G have the spread of `kind` (see _sims)."""
    words, patches = torch.randn(Bt, L, D), torch.randn(Bv, P, D)
    if kind == "clip":    # G ~ 0.25 + 0.03 N(0, 1): a shared direction plus small noise
        common = torch.randn(D)
        common = common / common.norm()
        words = 0.5 * common + (0.03 / math.sqrt(D)) ** 0.5 * words
        patches = 0.5 * common + (0.03 / math.sqrt(D)) ** 0.5 * patches
    elif kind == "cos":   # G ~ N(0, 0.35^2)
        words = words * (0.35 / math.sqrt(D)) ** 0.5
        patches = patches * (0.35 / math.sqrt(D)) ** 0.5
    # 'dot': raw unnormalised features, G ~ N(0, D)
    return words.to(dtype=dtype, device=device), patches.to(dtype=dtype, device=device)


def _bi_inputs(Bt, Bv, L, P, D, kind, dtype, device="cpu"):
    words, patches = _features(Bt, Bv, L, P, D, kind, dtype, device)
    return [words, patches] + [_weight(n, dtype, device) for n in (L, P, L, P)]


def _grads(fn, inputs, g):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    y = fn(*xs)
    return y, torch.autograd.grad(y, xs, g)


# ---------------------------------------------------------------------------------------------
# Semantics of the references (written independently of them, element by element).

def _isa_row(x, W, tau):
    a = torch.softmax(x / tau, 0)
    b = torch.stack([sum(a[i] * W[i, j] for i in range(len(x))) for j in range(len(x))])
    w = torch.softmax(b / tau, 0)
    return (w * x).sum()


def test_isa_reference_semantics():
    sim = _sims(3, 5, 4, kind="clip", dtype=torch.float64)
    W = _weight(5, torch.float64, eps=0.1)
    got = ref_isa(sim, W, dim=1, tau=0.02)
    want = torch.stack([torch.stack([_isa_row(sim[i, :, k], W, 0.02) for k in range(4)])
                        for i in range(3)])
    torch.testing.assert_close(got, want)
    # A constant row aggregates to that constant whatever the weight.
    const = torch.full((2, 6), 0.3, dtype=torch.float64)
    torch.testing.assert_close(ref_isa(const, _weight(6, torch.float64, eps=0.5)),
                               torch.full((2,), 0.3, dtype=torch.float64))


def test_bi_isa_reference_semantics():
    Bt, Bv, L, P, D = 2, 3, 4, 5, 6
    words, patches, ww, pw, ww2, pw2 = _bi_inputs(Bt, Bv, L, P, D, "clip", torch.float64)
    tau = 0.02
    got = ref_bi_isa(words, patches, ww, pw, ww2, pw2, tau)
    for t in range(Bt):
        for v in range(Bv):
            G = words[t] @ patches[v].T                                        # [L, P]
            ya = torch.stack([_isa_row(G[:, p], ww, tau) for p in range(P)])    # over words
            yb = torch.stack([_isa_row(G[l, :], pw, tau) for l in range(L)])    # over patches
            want = (_isa_row(ya, pw2, tau) + _isa_row(yb, ww2, tau)) / 2
            torch.testing.assert_close(got[t, v], want)


def test_softmaxes_are_neither_one_hot_nor_uniform():
    """The 'clip' inputs exercise the interesting regime at tau = 0.01."""
    a = torch.softmax(_sims(1000, 12, kind="clip", dtype=torch.float64) / 0.01, -1)
    top = a.max(-1).values
    assert 0.2 < top.median() < 0.9
    words, patches = _features(4, 4, 32, 48, 64, "clip", torch.float64)
    G = torch.einsum("tld,vpd->tlvp", words, patches)
    top = torch.softmax(G / 0.01, 3).max(3).values
    assert 0.2 < top.median() < 0.9


# ---------------------------------------------------------------------------------------------
# isa: fused backends against the reference.

ISA_CASES = [
    ((5, 7, 9), 1, "clip"),
    ((6, 5, 12), -1, "clip"),     # the frame axis (n = 12, compiled-in size)
    ((12, 4), 0, "cos"),
    ((2, 3, 4, 5), 2, "dot"),
    ((13,), 0, "clip"),           # 1-D: a scalar out
    ((3, 1, 6), 1, "clip"),       # n = 1
    ((1, 1), -1, "cos"),
    ((4, 33), -1, "clip"),
]


def _check_isa(backend, device, shape, dim, kind, dtype, noncontig=False):
    sim = _sims(*shape, kind=kind, dtype=dtype, device=device)
    if noncontig:
        sim = sim.transpose(0, -1).contiguous().transpose(0, -1)
        assert not sim.is_contiguous()
    W = _weight(shape[dim], dtype, device)
    g = torch.randn(ref_isa(sim, W, dim).shape, dtype=dtype, device=device)
    with tk.use_backend(backend):
        y, (gs, gw) = _grads(lambda s, w: tk.isa(s, w, dim=dim), [sim, W], g)
    ref = lambda s, w: ref_isa(s, w, dim=dim)  # noqa: E731
    yr, gr = _grads(ref, [sim, W], g)
    y64, g64 = _grads(ref, [sim.double(), W.double()], g.double())
    assert y.shape == yr.shape and y.dtype == dtype and gs.dtype == dtype and gw.dtype == dtype
    _compare(y, yr, y64, dtype)
    for a, b, c in zip((gs, gw), gr, g64):
        _compare(a, b, c, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ISA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_isa_matches_reference(device, case, dtype):
    for backend in fused_backends(device, ("cpp",)):
        _check_isa(backend, device, *case, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ISA_CASES[:5], ids=str)
def test_isa_triton_matches_reference(device, case):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")
    _check_isa("triton", device, *case, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_isa_layouts_and_many_rows(device):
    for backend in fused_backends(device, ("cpp", "triton")):
        _check_isa(backend, device, (12, 7, 3), 0, "clip", torch.float32, noncontig=True)
    for backend in fused_backends(device, ("cpp",)):
        _check_isa(backend, device, (257, 40, 12), -1, "clip", torch.float32)  # many tasks


# ---------------------------------------------------------------------------------------------
# bi_isa: fused backends against the reference (gradients to all six inputs).

BI_CASES = [
    (3, 5, 7, 5, 33, "clip"),
    (1, 1, 1, 1, 1, "cos"),
    (2, 3, 32, 48, 16, "clip"),   # the papers' L and P (compiled-in sizes)
    (4, 2, 9, 17, 40, "dot"),
    (2, 2, 7, 5, 33, "cos"),
]


def _check_bi(backend, device, case, dtype):
    inputs = _bi_inputs(*case, dtype, device)
    g = torch.randn(case[0], case[1], dtype=dtype, device=device)
    with tk.use_backend(backend):
        y, grads = _grads(tk.bi_isa, inputs, g)
    yr, grads_r = _grads(ref_bi_isa, inputs, g)
    y64, grads64 = _grads(ref_bi_isa, [x.double() for x in inputs], g.double())
    assert y.shape == (case[0], case[1]) and y.dtype == dtype
    _compare(y, yr, y64, dtype)
    for name, a, b, c in zip(("words", "patches", "word_weight", "patch_weight", "word_weight2",
                              "patch_weight2"), grads, grads_r, grads64):
        assert a.shape == b.shape and a.dtype == dtype, name
        _compare(a, b, c, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BI_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bi_isa_matches_reference(device, case, dtype):
    for backend in fused_backends(device, ("cpp",)):
        _check_bi(backend, device, case, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [BI_CASES[0], BI_CASES[1], BI_CASES[3]], ids=str)
def test_bi_isa_triton_matches_reference(device, case):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")
    _check_bi("triton", device, case, torch.float32)


def test_bi_isa_triton_float64():
    if "triton" not in fused_backends("cpu", ("triton",)):
        pytest.skip("triton interpreter unavailable")
    _check_bi("triton", "cpu", BI_CASES[0], torch.float64)


def test_bi_isa_cpp_crosses_blocks():
    """Bt and Bv larger than one C++ block (L = P = 64 gives 16 texts x 32 videos per block),
    with ragged last blocks in both directions."""
    if "cpp" not in fused_backends("cpu", ("cpp",)):
        pytest.skip("C++ extension not built")
    _check_bi("cpp", "cpu", (17, 35, 64, 64, 8, "clip"), torch.float32)


# ---------------------------------------------------------------------------------------------
# Triton: the large-n ISA path, Bi-ISA backward chunks, determinism, limits, GPU compilation.

def _triton_isa_module():
    if "triton" not in fused_backends("cpu", ("triton",)):
        pytest.skip("triton interpreter unavailable")
    from tvr_kernels.triton import isa as triton_isa
    return triton_isa


TILED_CASES = [
    ((5, 7, 33), -1, "clip"),     # three column blocks of 16, the last ragged
    ((4, 17), -1, "cos"),
    ((9, 3), 0, "dot"),           # one block
    ((3, 2, 40), -1, "clip"),
]


@pytest.mark.parametrize("case", TILED_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_isa_triton_tiled_path(monkeypatch, case, dtype):
    """The path for n too large to hold a row and the weight whole (float32: n > 64 forward,
    n > 32 backward; float64: half), forced here at small n with 16-wide column blocks, and a scratch of a few rows so that the
    backward runs in several row chunks (the last one ragged)."""
    triton_isa = _triton_isa_module()
    monkeypatch.setattr(triton_isa, "_ISA_ROWS_MAX_N", (8, 8))
    monkeypatch.setattr(triton_isa, "_ISA_TILE_C", (16, 16))
    n = case[0][case[1]]
    monkeypatch.setattr(triton_isa, "_ISA_SCRATCH_BYTES", 2 * n * dtype.itemsize * 4)  # 4 rows
    assert all(triton_isa._isa_plan(10, n, dtype.itemsize, bwd)["tiled"] for bwd in (0, 1))
    _check_isa("triton", "cpu", *case, dtype)


def test_isa_triton_patch_axes():
    """The papers' patch axes with the launcher's own choices: n = 48 (UCoFiA's selected
    patches) runs the rows path forward and the tiled path backward; n = 196 (ViT-B/16
    patches) the tiled path both ways, with its GPU block widths."""
    triton_isa = _triton_isa_module()
    assert [triton_isa._isa_plan(6, 48, 4, bwd)["tiled"] for bwd in (0, 1)] == [False, True]
    _check_isa("triton", "cpu", (3, 5, 48), -1, "clip", torch.float32)
    assert all(triton_isa._isa_plan(6, 196, 4, bwd)["tiled"] for bwd in (0, 1))
    _check_isa("triton", "cpu", (2, 3, 196), -1, "clip", torch.float32)
    # float16 storage, float32 compute: against the reference on the same (rounded) values.
    sim = _sims(2, 3, 196, kind="clip", dtype=torch.float16)
    W = _weight(196, torch.float16)
    with tk.use_backend("triton"):
        y, (gs, gw) = _grads(tk.isa, [sim, W], torch.randn(2, 3, dtype=torch.float16))
    assert y.dtype == gs.dtype == gw.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref_isa(sim.float(), W.float()), rtol=2e-3, atol=2e-3)


def _bi_pair_bytes(L, P, itemsize):
    return (5 * L * P + 2 * (L + P)) * itemsize


@pytest.mark.parametrize("pairs,chunk", [(4, (2, 2)), (7, (2, 3))], ids=str)
def test_bi_isa_triton_chunks(monkeypatch, pairs, chunk):
    """The backward's buffers hold a chunk of pairs: forced small, texts and videos split
    into several chunks, the last ragged. The forward's grid limit, forced down, splits the
    texts too. D = 150 also spans two blocks of D."""
    triton_isa = _triton_isa_module()
    Bt, Bv, L, P = 3, 5, 7, 5
    monkeypatch.setattr(triton_isa, "_BI_BWD_BUFFER_BYTES", pairs * _bi_pair_bytes(L, P, 4))
    monkeypatch.setattr(triton_isa, "_MAX_GRID", 2 * Bv - 1)    # one text per launch
    assert triton_isa._bi_chunks(Bt, Bv, L, P, 4) == chunk
    _check_bi("triton", "cpu", (Bt, Bv, L, P, 150, "clip"), torch.float32)


def test_triton_backward_is_deterministic(monkeypatch):
    """Bitwise the same gradients on a second run (no atomics: fixed summation orders)."""
    triton_isa = _triton_isa_module()
    L, P = 9, 17
    monkeypatch.setattr(triton_isa, "_BI_BWD_BUFFER_BYTES", 4 * _bi_pair_bytes(L, P, 4))
    bi = _bi_inputs(3, 4, L, P, 24, "clip", torch.float32)
    g = torch.randn(3, 4)
    sim, W = _sims(6, 5, 40, kind="clip", dtype=torch.float32), _weight(40, torch.float32)
    gs = torch.randn(6, 5)
    with tk.use_backend("triton"):
        runs = [_grads(tk.bi_isa, bi, g)[1] + _grads(tk.isa, [sim, W], gs)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bi_isa_triton_rejects_large_L_or_P():
    """The weight tiles are held whole: the launcher refuses L or P > 64 before launching."""
    _triton_isa_module()
    words, patches = torch.randn(2, 129, 4), torch.randn(3, 5, 4)
    ws = [torch.eye(n) for n in (129, 5, 129, 5)]
    with tk.use_backend("triton"), pytest.raises(ValueError, match=r"L = 129 and P = 5 .* <= 64"):
        tk.bi_isa(words, patches, *ws)


_COMPILE_SCRIPT = r"""
import json, os, re, subprocess, sys
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as e:
    print(json.dumps({"skip": f"triton compile API unavailable: {e}"})); sys.exit(0)
if not hasattr(JITFunction, "_pack_args"):
    print(json.dumps({"skip": "triton compile API unavailable: JITFunction._pack_args"}))
    sys.exit(0)
from tvr_kernels.triton import isa as K

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
found = []

class Stop(Exception):
    pass

def launch_of(fn):
    def launch(*args, **kwargs):       # compile the launch's specialisation instead of running
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                            options=options.__dict__)
        found.append({"kernel": fn.fn.__name__, "shared": ck.metadata.shared})
        raise Stop
    return launch

JITFunction.__getitem__ = lambda self, grid: launch_of(self)

def run(f, *args):
    try:
        f(*args)
    except Stop:
        pass

f32 = dict(dtype=torch.float32)
for n in (12, 48, 196):    # rows; rows forward, tiled backward; tiled
    x, w = torch.randn(64, n, **f32), torch.randn(n, n, **f32)
    run(K.isa_fwd, x, w, 0.01)
    run(K.isa_bwd, torch.randn(64, **f32), x, w, 0.01)
words, patches = torch.randn(64, 32, 512, **f32), torch.randn(64, 48, 512, **f32)
ws = [torch.randn(n, n, **f32) for n in (32, 48, 32, 48)]
run(K.bi_isa_fwd, words, patches, *ws, 0.01)
run(K.bi_isa_bwd, torch.randn(64, 64, **f32), words, patches, *ws, 0.01)
print(json.dumps({"kernels": found}))
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    """The launches at the papers' shapes (ISA n = 12, 48, 196, Bi-ISA L = 32, P = 48, D = 512;
    float32) compile for sm_90 (no GPU needed: Triton compiles for a target) within its
    shared memory. The interpreter enforces none of the compiler's rules."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    names = [k["kernel"] for k in res["kernels"]]
    assert names == ["_isa_rows_fwd_kernel", "_isa_rows_bwd_kernel", "_isa_rows_fwd_kernel",
                     "_isa_tiled_bwd_kernel", "_isa_tiled_fwd_kernel", "_isa_tiled_bwd_kernel",
                     "_bi_isa_fwd_kernel", "_bi_isa_bwd_kernel"], names
    for k in res["kernels"]:
        assert k["shared"] <= 232448, k    # sm_90's shared memory per block


def test_bi_isa_noncontiguous_and_half():
    for backend in fused_backends("cpu", ("cpp", "triton")):
        words, patches, *ws = _bi_inputs(3, 4, 6, 5, 8, "clip", torch.float32)
        words_nc = words.transpose(1, 2).contiguous().transpose(1, 2)
        assert not words_nc.is_contiguous()
        with tk.use_backend(backend):
            y = tk.bi_isa(words_nc, patches, *ws)
        _close(y, ref_bi_isa(words, patches, *ws), 1e-4)
        # float16 storage, float32 compute: against the reference on the same (rounded) values.
        half = [x.half() for x in (words, patches, *ws)]
        with tk.use_backend(backend):
            yh = tk.bi_isa(*half)
        assert yh.dtype == torch.float16
        torch.testing.assert_close(yh.float(), ref_bi_isa(*[x.float() for x in half]),
                                   rtol=2e-3, atol=2e-3)


def test_cpp_flushes_denormals_and_restores_the_callers_mode():
    """The C++ kernels compute with denormals flushed (csrc/include/tvr/fp_env.h) and put the
    calling thread's mode back: afterwards torch still makes denormals here. Inputs whose
    second-stage softmax weights are denormal in the reference (B spans [0, 1] at tau =
    0.01: exp(-100) ~ 4e-44) still match it."""
    if "cpp" not in fused_backends("cpu", ("cpp",)):
        pytest.skip("C++ extension not built")
    tiny = torch.tensor([1e-39])
    assert (tiny * 0.5).item() != 0.0, "denormals already flushed before the test"
    words, patches, *ws = _bi_inputs(3, 2, 32, 48, 16, "cos", torch.float32)
    words, patches = words * 3, patches * 3   # G spans ~[-3, 3]: the softmaxes underflow
    g = torch.randn(3, 2)
    with tk.use_backend("cpp"):
        y, grads = _grads(tk.bi_isa, [words, patches, *ws], g)
    y64, grads64 = _grads(ref_bi_isa, [x.double() for x in (words, patches, *ws)], g.double())
    _close(y, y64, 1e-4)
    for a, c in zip(grads, grads64):
        _close(a, c, 1e-4, ref_err=1e-6)
    assert (tiny * 0.5).item() != 0.0, "the kernel left flush-to-zero on in the caller's thread"


# ---------------------------------------------------------------------------------------------
# Gradchecks, opcheck, torch.compile, backend recording.

def test_gradcheck_references():
    f64 = dict(dtype=torch.float64)
    for tau, kind in ((0.5, "cos"), (0.01, "clip")):
        sim = _sims(3, 4, 5, kind=kind, **f64).requires_grad_()
        W = _weight(4, torch.float64, eps=0.1).requires_grad_()
        assert torch.autograd.gradcheck(lambda s, w: ref_isa(s, w, 1, tau), (sim, W))
        inputs = [x.requires_grad_() for x in _bi_inputs(2, 2, 3, 4, 5, kind, torch.float64)]
        assert torch.autograd.gradcheck(lambda *a: ref_bi_isa(*a, tau=tau), inputs)


def test_gradcheck_cpp():
    if "cpp" not in fused_backends("cpu", ("cpp",)):
        pytest.skip("C++ extension not built")
    sim = _sims(3, 4, 5, kind="cos", dtype=torch.float64).requires_grad_()
    W = _weight(4, torch.float64, eps=0.1).requires_grad_()
    inputs = [x.requires_grad_() for x in _bi_inputs(2, 3, 3, 4, 5, "cos", torch.float64)]
    with tk.use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda s, w: tk.isa(s, w, 1, 0.5), (sim, W))
        assert torch.autograd.gradcheck(lambda *a: tk.bi_isa(*a, tau=0.5), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    sim = _sims(3, 5, 4, kind="clip", dtype=torch.float32, device=device).requires_grad_()
    W = _weight(5, torch.float32, device).requires_grad_()
    bi = [x.requires_grad_() for x in _bi_inputs(2, 3, 4, 5, 6, "clip", torch.float32, device)]
    for backend in ["", *fused_backends(device, ("cpp",))]:
        torch.library.opcheck(torch.ops.tvr.isa.default, (sim, W, 1, 0.01, backend))
        g = torch.randn(3, 4, device=device)
        torch.library.opcheck(torch.ops.tvr.isa_backward.default,
                              (g, sim.detach(), W.detach(), 1, 0.01, backend))
        torch.library.opcheck(torch.ops.tvr.bi_isa.default, (*bi, 0.01, backend))
        g = torch.randn(2, 3, device=device)
        torch.library.opcheck(torch.ops.tvr.bi_isa_backward.default,
                              (g, *[x.detach() for x in bi], 0.01, backend))


def _check_fn(fn, ref, inputs, g):
    y, grads = _grads(fn, inputs, g)
    yr, grads_r = _grads(ref, inputs, g)
    y64, grads64 = _grads(ref, [x.double() for x in inputs], g.double())
    _compare(y, yr, y64, torch.float32)
    for a, b, c in zip(grads, grads_r, grads64):
        _compare(a, b, c, torch.float32)


def test_compile_fullgraph():
    sim = _sims(4, 6, 12, kind="clip", dtype=torch.float32)
    W = _weight(12, torch.float32)
    f = torch.compile(lambda s, w: tk.isa(s, w, dim=-1) * 2.0, fullgraph=True)
    _check_fn(f, lambda s, w: ref_isa(s, w, dim=-1) * 2.0, [sim, W], torch.randn(4, 6))
    bi = _bi_inputs(2, 3, 5, 4, 8, "clip", torch.float32)
    f = torch.compile(lambda *a: tk.bi_isa(*a) + 1.0, fullgraph=True)
    _check_fn(f, lambda *a: ref_bi_isa(*a) + 1.0, bi, torch.randn(2, 3))


def test_backward_outside_backend_block_uses_forward_backend(monkeypatch):
    bi = [x.requires_grad_() for x in _bi_inputs(2, 2, 3, 4, 5, "clip", torch.float32)]
    with tk.use_backend("reference"):
        y = tk.bi_isa(*bi)
    # Poison the C++ kernel: a backward resolved by default (cpp) instead of the recorded
    # reference backend would raise.
    import tvr_kernels.ops.isa as isa_ops
    monkeypatch.setattr(isa_ops, "pick", lambda op, like, backend, *a, **k: (
        backend if backend else pytest.fail("backward lost its forward's backend")))
    y.sum().backward()
    _, grads_r = _grads(ref_bi_isa, bi, torch.ones(2, 2))
    _close(bi[0].grad, grads_r[0], 1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input.

_S, _W = torch.randn(4, 12), torch.eye(12)
_w, _p = torch.randn(2, 5, 8), torch.randn(3, 6, 8)
_WL, _WP = torch.eye(5), torch.eye(6)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.tensor(1.0), torch.eye(1)), {}, ValueError, "sim must have at least 1 dimension"),
    ((_S, torch.eye(11)), {}, ValueError, r"weight must be \[12, 12\]"),
    ((_S, torch.eye(12)[None]), {}, ValueError, r"weight must be 2-D \[12, 12\]"),
    ((_S, torch.ones(12, 4)), dict(dim=0), ValueError, r"weight must be \[4, 4\]"),
    ((_S, _W), dict(dim=2), ValueError, "dim must be <= 1"),
    ((_S, _W), dict(dim=-3), ValueError, "dim must be >= -2"),
    ((_S, _W), dict(tau=0.0), ValueError, "tau must be finite and > 0"),
    ((_S, _W), dict(tau=-0.1), ValueError, "tau must be finite and > 0"),
    ((_S, _W), dict(tau=float("inf")), ValueError, "tau must be finite and > 0"),
    ((_S, _W), dict(tau=float("nan")), ValueError, "tau must be finite and > 0"),
    ((_S, _W.double()), {}, TypeError, "one dtype"),
    ((_S.long(), _W), {}, TypeError, "sim must have dtype"),
    (([[1.0]], _W), {}, TypeError, "sim must be a torch.Tensor"),
    ((torch.randn(3, 0), torch.eye(0)), {}, ValueError, "reduced axis"),
])
def test_isa_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.isa(*args, **kwargs)
    with pytest.raises(err, match=match):
        ref_isa(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((_w[0], _p, _WL, _WP, _WL, _WP), {}, ValueError, r"words must be 3-D \[Bt, L, D\]"),
    ((_w, _p[0], _WL, _WP, _WL, _WP), {}, ValueError, r"patches must be 3-D \[Bv, P, D\]"),
    ((_w, torch.randn(3, 6, 7), _WL, _WP, _WL, _WP), {}, ValueError, "same D"),
    ((_w, _p, _WP, _WP, _WL, _WP), {}, ValueError, r"word_weight must be \[5, 5\]"),
    ((_w, _p, _WL, _WL, _WL, _WP), {}, ValueError, r"patch_weight must be \[6, 6\]"),
    ((_w, _p, _WL, _WP, torch.eye(4), _WP), {}, ValueError, r"word_weight2 must be \[5, 5\]"),
    ((_w, _p, _WL, _WP, _WL, torch.ones(6, 5)), {}, ValueError, r"patch_weight2 must be \[6, 6\]"),
    ((_w, _p, _WL, _WP, _WL, _WP[0]), {}, ValueError, r"patch_weight2 must be 2-D \[6, 6\]"),
    ((_w, _p, _WL, _WP, _WL, _WP), dict(tau=0), ValueError, "tau must be finite and > 0"),
    ((_w, _p, _WL, _WP, _WL, _WP), dict(tau=float("nan")), ValueError, "tau must be finite"),
    ((_w, _p.double(), _WL, _WP, _WL, _WP), {}, TypeError, "one dtype"),
    ((_w, _p, _WL, _WP.double(), _WL, _WP), {}, TypeError, "one dtype"),
    ((_w.long(), _p, _WL, _WP, _WL, _WP), {}, TypeError, "words must have dtype"),
    ((torch.randn(2, 0, 8), _p, torch.eye(0), _WP, torch.eye(0), _WP), {}, ValueError, "L .* >= 1"),
])
def test_bi_isa_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.bi_isa(*args, **kwargs)
    with pytest.raises(err, match=match):
        ref_bi_isa(*args, **kwargs)


def test_device_mismatch_message():
    """Device checks name the tensors (a meta tensor stands in for a second device)."""
    with pytest.raises(ValueError, match="one device"):
        ref_isa(_S, torch.eye(12, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        tk.bi_isa(_w, _p.to("meta"), _WL, _WP, _WL, _WP)
