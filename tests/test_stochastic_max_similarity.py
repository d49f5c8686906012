"""stochastic_max_similarity (SPEC 5): every backend against the reference, with injected and
with seeded noise; chunking invariance; gradients; the authors' radius module; bad inputs."""
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import tvr_kernels as tk
from tvr_kernels.reference import stochastic_max_similarity as ref_smsim
from tvr_kernels.reference.stochastic_max_similarity import (authors_stochastic_text, noise_at,
                                                             philox_noise, radius)

from conftest import DEVICES, fused_backends
from helpers import TOL, close, randn

# (Nt, Nv, T, D, M): odd sizes, T = 1, M = 1, D not a multiple of 4, the paper's T = 12.
SHAPES = [(3, 5, 12, 7, 6), (4, 3, 1, 16, 1), (2, 2, 12, 33, 20), (5, 4, 3, 64, 4), (1, 1, 2, 5, 3)]


def _inputs(Nt, Nv, T, D, dtype=torch.float32, requires_grad=False):
    # Radius weights small enough that R stays O(1) (as the authors' identity init does).
    return dict(text=randn(Nt, D, dtype=dtype, requires_grad=requires_grad),
                frames=randn(Nv, T, D, dtype=dtype, requires_grad=requires_grad),
                pooled=randn(Nv, Nt, D, dtype=dtype, requires_grad=requires_grad),
                radius_weight=randn(D, T, dtype=dtype, requires_grad=requires_grad, scale=0.3),
                radius_bias=randn(D, dtype=dtype, requires_grad=requires_grad, scale=0.3))


def _all_cosines(inp, noise):
    """c_m of every pair and sample, straight from the definition: [Nt, Nv, M] (float64)."""
    x = {k: v.detach().double() for k, v in inp.items()}
    R = radius(x["text"], x["frames"], x["radius_weight"], x["radius_bias"])
    t = x["text"][:, None, None, :] + noise.double() * R[:, :, None, :]
    return F.cosine_similarity(t, x["pooled"].transpose(0, 1)[:, :, None, :], dim=-1)


def _check_best(best, best_ref, cos, margin=1e-4):
    """Exact argmax wherever the top two samples are separated by more than ``margin``."""
    M = cos.shape[-1]
    if M == 1:
        assert torch.equal(best, torch.zeros_like(best))
        return
    top2 = cos.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > margin
    assert clear.float().mean() > 0.5, "test inputs should mostly have clear winners"
    assert torch.equal(best[clear], best_ref[clear])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_injected_noise_matches_reference(shape, dtype):
    Nt, Nv, T, D, M = shape
    inp = _inputs(Nt, Nv, T, D, dtype)
    noise = torch.rand(Nt, Nv, M, D, dtype=dtype)
    s_ref, b_ref = ref_smsim(**inp, num_samples=M, noise=noise)
    cos = _all_cosines(inp, noise)
    close(s_ref, cos.max(-1).values.to(dtype), dtype)  # the reference is the definition
    for backend in fused_backends("cpu", ("cpp",)):
        with tk.use_backend(backend):
            s, b = tk.stochastic_max_similarity(**inp, num_samples=M, noise=noise)
        assert s.dtype == dtype and b.dtype == torch.int64 and s.shape == (Nt, Nv)
        close(s, s_ref, dtype)
        _check_best(b, b_ref, cos)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("prior", ["uniform", "normal"])
def test_seeded_matches_reference(shape, prior):
    Nt, Nv, T, D, M = shape
    inp = _inputs(Nt, Nv, T, D)
    s_ref, b_ref = ref_smsim(**inp, num_samples=M, prior=prior, std=0.7, seed=1234)
    noise = philox_noise(1234, torch.arange(Nt), torch.arange(Nv), M, D, prior, 0.7)
    # The seeded reference is the injected-noise reference on its own Philox draws.
    s_inj, b_inj = ref_smsim(**inp, num_samples=M, noise=noise)
    assert torch.equal(s_ref, s_inj) and torch.equal(b_ref, b_inj)
    for backend in fused_backends("cpu", ("cpp",)):
        with tk.use_backend(backend):
            s, b = tk.stochastic_max_similarity(**inp, num_samples=M, prior=prior, std=0.7, seed=1234)
        close(s, s_ref)
        _check_best(b, b_ref, _all_cosines(inp, noise))


def test_float64_seeded():
    inp = _inputs(3, 4, 5, 9, torch.float64)
    for prior in ("uniform", "normal"):
        s_ref, b_ref = ref_smsim(**inp, num_samples=5, prior=prior, seed=7)
        with tk.use_backend("cpp"):
            s, b = tk.stochastic_max_similarity(**inp, num_samples=5, prior=prior, seed=7)
        # Uniforms are exact on every backend; Box-Muller's log/cos/sin may round differently
        # in float32 (libm vs torch), so the normal prior is compared at float32 precision.
        close(s, s_ref, torch.float64 if prior == "uniform" else torch.float32)
        assert torch.equal(b, b_ref)


def test_half_and_bf16_compute_in_float32():
    inp32 = _inputs(3, 4, 12, 16)
    for dtype in (torch.float16, torch.bfloat16):
        inp = {k: v.to(dtype) for k, v in inp32.items()}
        s_ref, _ = ref_smsim(**inp, num_samples=4, seed=3)
        with tk.use_backend("cpp"):
            s, _ = tk.stochastic_max_similarity(**inp, num_samples=4, seed=3)
        assert s.dtype == dtype
        close(s, s_ref, dtype)


def test_noise_keying_and_priors():
    """Uniform draws lie in [0, 1); normal draws scale with std; the noise of a pair does not
    depend on which other pairs are drawn with it."""
    u = philox_noise(5, torch.arange(6), torch.arange(7), 8, 40, "uniform", 1.0)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    n = philox_noise(5, torch.arange(6), torch.arange(7), 8, 40, "normal", 2.5)
    assert abs(n.std() - 2.5) < 0.1 and abs(n.mean()) < 0.1
    sub = noise_at(5, torch.tensor(4), torch.tensor(2), torch.tensor(6), 40, "uniform", 1.0)
    assert torch.equal(sub, u[4, 2, 6])
    assert not torch.equal(u[0, 0, 0], u[0, 0, 1]) and not torch.equal(u[0, 0, 0], u[0, 1, 0])


def test_reproducible_and_seed_sensitive():
    inp = _inputs(4, 5, 12, 32)
    with tk.use_backend("cpp"):
        a = tk.stochastic_max_similarity(**inp, num_samples=8, seed=11)
        b = tk.stochastic_max_similarity(**inp, num_samples=8, seed=11)
        c = tk.stochastic_max_similarity(**inp, num_samples=8, seed=12)
        torch.manual_seed(3)
        d = tk.stochastic_max_similarity(**inp, num_samples=8)
        torch.manual_seed(3)
        e = tk.stochastic_max_similarity(**inp, num_samples=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(d[0], e[0]), "seed=None follows torch.manual_seed"


@pytest.mark.parametrize("backend", ["reference", *fused_backends("cpu", ("cpp", "triton"))])
def test_chunking_invariant(backend):
    """Scoring sub-blocks of texts and videos with their pair_offset reproduces the entries of
    one call over everything bit for bit (the noise depends on the pair, not the launch, and
    every backend computes each entry from its pair alone)."""
    # the interpreter takes ~0.1 s per program at T = 12, M = 5: one frame, two samples
    Nt, Nv, T, M = (7, 6, 1, 2) if backend == "triton" else (7, 6, 12, 5)
    inp = _inputs(Nt, Nv, T, 24)
    with tk.use_backend(backend):
        s, b = tk.stochastic_max_similarity(**inp, num_samples=M, seed=99)
        for (i0, i1, j0, j1) in [(2, 5, 1, 4), (0, 7, 3, 6), (6, 7, 0, 1)]:
            sub = dict(text=inp["text"][i0:i1], frames=inp["frames"][j0:j1],
                       pooled=inp["pooled"][j0:j1, i0:i1], radius_weight=inp["radius_weight"],
                       radius_bias=inp["radius_bias"])
            sc, bc = tk.stochastic_max_similarity(**sub, num_samples=M, seed=99, pair_offset=(i0, j0))
            assert torch.equal(sc, s[i0:i1, j0:j1])
            assert torch.equal(bc, b[i0:i1, j0:j1])
            # Without the offset the chunk draws other noise: the offset is what makes it agree.
            sw, _ = tk.stochastic_max_similarity(**sub, num_samples=M, seed=99)
            assert i0 == j0 == 0 or not torch.equal(sw, s[i0:i1, j0:j1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_chunking_exact(dtype, monkeypatch):
    """The reference's promise at random chunkings, odd D and T, both priors and injected
    noise, with and without its own internal chunking of texts: its radius once went through
    a matmul whose rounding depended on the batch shape (1 ulp off)."""
    ref_module = sys.modules[ref_smsim.__module__]
    gen = random.Random(0)
    for shape in [(9, 7, 12, 33, 5), (5, 6, 1, 64, 20), (6, 8, 5, 7, 1), (4, 9, 2, 100, 3)]:
        Nt, Nv, T, D, M = shape
        inp = _inputs(Nt, Nv, T, D, dtype)
        noise = torch.rand(Nt, Nv, M, D, dtype=dtype)
        for kw in (dict(seed=9), dict(prior="normal", std=0.7, seed=9), dict(noise=noise)):
            s, b = ref_smsim(**inp, num_samples=M, **kw)
            for chunk_elems in (1, 1000, 1 << 22):  # 1: one text per internal chunk
                monkeypatch.setattr(ref_module, "_CHUNK_ELEMS", chunk_elems)
                i0, j0 = gen.randrange(Nt), gen.randrange(Nv)
                i1, j1 = gen.randint(i0 + 1, Nt), gen.randint(j0 + 1, Nv)
                sub = dict(text=inp["text"][i0:i1], frames=inp["frames"][j0:j1],
                           pooled=inp["pooled"][j0:j1, i0:i1], radius_weight=inp["radius_weight"],
                           radius_bias=inp["radius_bias"])
                sub_kw = dict(noise=noise[i0:i1, j0:j1]) if "noise" in kw else kw
                sc, bc = ref_smsim(**sub, num_samples=M, pair_offset=(i0, j0), **sub_kw)
                assert torch.equal(sc, s[i0:i1, j0:j1]), (shape, kw.keys(), chunk_elems)
                assert torch.equal(bc, b[i0:i1, j0:j1])


@pytest.mark.parametrize("prior", ["uniform", "normal"])
@pytest.mark.parametrize("source", ["seed", "noise"])
def test_gradients_match_reference(prior, source):
    Nt, Nv, T, D, M = 3, 4, 12, 10, 5
    inp = _inputs(Nt, Nv, T, D, torch.float64, requires_grad=True)
    kw = dict(num_samples=M, prior=prior, std=0.5)
    if source == "noise":
        kw["noise"] = torch.randn(Nt, Nv, M, D, dtype=torch.float64)
    else:
        kw["seed"] = 21
    g = torch.randn(Nt, Nv, dtype=torch.float64)
    s_ref, b_ref = ref_smsim(**inp, **kw)
    want = torch.autograd.grad(s_ref, list(inp.values()), g)
    # Triton (interpreted: slow at T = 12) is covered by test_triton_backward_matches_reference
    # and test_triton_autograd_matches_reference.
    for backend in ["reference", *fused_backends("cpu", ("cpp",))]:
        with tk.use_backend(backend):
            s, b = tk.stochastic_max_similarity(**inp, **kw)
        got = torch.autograd.grad(s, list(inp.values()), g)
        assert torch.equal(b, b_ref)
        tol = torch.float64 if (prior == "uniform" or source == "noise") else torch.float32
        for name, x, y in zip(inp, got, want):
            torch.testing.assert_close(x, y, **TOL[tol], msg=lambda m, n=name: f"{n}: {m}")


def test_gradcheck_selected_sample():
    """The op's gradient is the derivative of the selected sample (best held fixed)."""
    inp = _inputs(2, 3, 4, 6, torch.float64, requires_grad=True)
    with tk.use_backend("cpp"):
        s, best = tk.stochastic_max_similarity(**inp, num_samples=4, seed=5)

    def f(*xs):
        with tk.use_backend("cpp"):
            return tk.stochastic_max_similarity(*xs, 4, seed=5)[0]
    # Perturbations of gradcheck's size do not change the argmax at these margins.
    assert torch.autograd.gradcheck(f, tuple(inp.values()), eps=1e-7, atol=1e-6)


def test_gradient_float32_cpp():
    inp = _inputs(4, 5, 12, 32, requires_grad=True)
    g = torch.randn(4, 5)
    s_ref, _ = ref_smsim(**inp, num_samples=6, seed=8)
    want = torch.autograd.grad(s_ref, list(inp.values()), g)
    with tk.use_backend("cpp"):
        s, _ = tk.stochastic_max_similarity(**inp, num_samples=6, seed=8)
    got = torch.autograd.grad(s, list(inp.values()), g)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ Triton
# Triton runs on CPU tensors in the interpreter here (~2-3 ms per program and loop trip): small
# shapes. On a GPU the same tests also run on cuda, with the paper's sizes added.
TRITON_SHAPES = [(2, 3, 3, 7, 3), (1, 1, 1, 1, 1), (3, 2, 12, 9, 4), (1, 4, 2, 33, 2)]
GPU_SHAPES = [(16, 24, 12, 512, 20), (5, 19, 12, 64, 7)]
# cuda variants are collected everywhere and skipped without a device (DEVICES has no cuda).
DEVICE_PARAMS = [pytest.param(d, marks=pytest.mark.skipif(d not in DEVICES,
                                                          reason="no CUDA device"))
                 for d in ("cpu", "cuda")]
# Compiled for the GPU, Triton's float32 exp, sqrt and division are approximate instructions
# (ex2.approx, sqrt.approx, div.full: ~2 ulp each; log/sin/cos go through libdevice, ~1 ulp),
# where the interpreter calls numpy: float32 results on cuda are compared at this looser
# tolerance (a cosine of D = 512 terms through a few such steps: ~1e-6 relative, x10 margin).
GPU_TOL32 = dict(rtol=1e-4, atol=2e-5)
# Gradients of float32 (and of the normal prior) against the reference: the kernel and the
# reference sum in different orders and write the cosine's derivative differently.
GRAD_TOL32 = dict(rtol=1e-4, atol=1e-5)


def _triton_or_skip(device):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")


def _triton_shapes(device):
    return TRITON_SHAPES + (GPU_SHAPES if device == "cuda" else [])


def _source_kwargs(source, shape, dtype, device, offset=(0, 0)):
    """Keyword arguments of one noise source: seeded uniform/normal (a seed whose high key
    word is 1 after the stream XOR is not special: any seed works) or injected noise."""
    Nt, Nv, T, D, M = shape
    kw = dict(num_samples=M, pair_offset=offset)
    if source == "noise":
        kw.update(prior="normal", noise=randn(Nt, Nv, M, D, dtype=dtype, device=device))
    else:
        kw.update(prior=source, std=0.7, seed=2 ** 32 + 7)
    return kw


def _noise_of(kw, shape, device):
    Nt, Nv, T, D, M = shape
    if kw.get("noise") is not None:
        return kw["noise"]
    i0, j0 = kw["pair_offset"]
    return philox_noise(kw["seed"], torch.arange(Nt, device=device) + i0,
                        torch.arange(Nv, device=device) + j0, M, D, kw["prior"], kw["std"])


def _tol(dtype, device, source, grad=False):
    if dtype == torch.float64 and source != "normal":
        return TOL[torch.float64]
    if dtype in (torch.float16, torch.bfloat16):
        return TOL[dtype]
    if device == "cuda":
        return GPU_TOL32
    return GRAD_TOL32 if grad else TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("source", ["uniform", "normal", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_forward_matches_reference(device, source, dtype):
    _triton_or_skip(device)
    for shape in _triton_shapes(device):
        Nt, Nv, T, D, M = shape
        inp = {k: v.to(device) for k, v in _inputs(Nt, Nv, T, D, dtype).items()}
        kw = _source_kwargs(source, shape, dtype, device, offset=(5, 2))
        s_ref, b_ref = ref_smsim(**inp, **kw)
        with tk.use_backend("triton"):
            s, b = tk.stochastic_max_similarity(**inp, **kw)
        assert s.dtype == dtype and s.device.type == device and b.dtype == torch.int64
        close(s, s_ref, dtype, **_tol(dtype, device, source), msg=str(shape))
        _check_best(b.cpu(), b_ref.cpu(), _all_cosines(inp, _noise_of(kw, shape, device)).cpu())


def _check_triton_backward(device, shape, source, dtype, offset=(0, 0)):
    """The Triton backward op against the reference backward op, on the same random ``best``
    (any sample index: the backward needs no forward), seeded or injected noise."""
    Nt, Nv, T, D, M = shape
    inp = {k: v.to(device) for k, v in _inputs(Nt, Nv, T, D, dtype).items()}
    kw = _source_kwargs(source, shape, dtype, device, offset)
    best = torch.randint(0, M, (Nt, Nv), device=device)
    g = randn(Nt, Nv, dtype=dtype, device=device)
    args = (g, *inp.values(), best, M, kw["prior"], float(kw.get("std", 1.0)), kw.get("seed", 0),
            kw.get("noise"), offset[0], offset[1])
    got = torch.ops.tvr.stochastic_max_similarity_backward(*args, "triton")
    want = torch.ops.tvr.stochastic_max_similarity_backward(*args, "reference")
    tol = _tol(dtype, device, source, grad=True)
    for name, x, y in zip(inp, got, want):
        assert x.dtype == dtype and x.shape == y.shape and x.device == y.device, name
        # the gradient is O(|grad|) and sums over pairs: atol at the scale of its largest entry
        scale = max(1.0, float(y.abs().max()))
        torch.testing.assert_close(x, y, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, n=name: f"{n} {shape}: {m}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("source", ["uniform", "normal", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_backward_matches_reference(device, source, dtype):
    _triton_or_skip(device)
    for shape in _triton_shapes(device):
        _check_triton_backward(device, shape, source, dtype, offset=(3, 11))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_triton_backward_video_blocks(device, monkeypatch):
    """Programs that walk several videos, the last block partial (the GPU's layout; the
    interpreter otherwise gives each text one program over every video)."""
    _triton_or_skip(device)
    import tvr_kernels.triton.stochastic_max_similarity as tri
    monkeypatch.setattr(tri, "_videos_per_program", lambda Nv: 2)
    for source in ("uniform", "noise"):
        _check_triton_backward(device, (2, 5, 3, 6, 3), source, torch.float64, offset=(1, 4))
    # deterministic: no atomics, so a second run gives the same bits
    inp = {k: v.to(device) for k, v in _inputs(2, 5, 3, 6).items()}
    args = (torch.randn(2, 5, device=device), *inp.values(),
            torch.randint(0, 3, (2, 5), device=device), 3, "normal", 0.5, 9, None, 0, 0, "triton")
    first = torch.ops.tvr.stochastic_max_similarity_backward(*args)
    again = torch.ops.tvr.stochastic_max_similarity_backward(*args)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_types(device, dtype):
    """Half inputs load as is and compute in float32 (forward and backward), as the
    reference; compared at the half dtype's tolerance. bf16 is broken in the interpreter."""
    _triton_or_skip(device)
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bfloat16 is broken in the Triton interpreter (tested on GPU)")
    shape = (2, 3, 3, 16, 4)
    Nt, Nv, T, D, M = shape
    inp = {k: v.to(device) for k, v in _inputs(Nt, Nv, T, D, dtype).items()}
    s_ref, _ = ref_smsim(**inp, num_samples=M, seed=3)
    with tk.use_backend("triton"):
        s, _ = tk.stochastic_max_similarity(**inp, num_samples=M, seed=3)
    assert s.dtype == dtype
    close(s, s_ref, dtype)
    for source in ("uniform", "noise"):
        _check_triton_backward(device, shape, source, dtype)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_triton_autograd_matches_reference(device):
    """End to end: forward and autograd backward of the triton backend against the
    reference, seeded uniform with a chunk offset and injected normal noise."""
    _triton_or_skip(device)
    Nt, Nv, T, D, M = 2, 3, 3, 7, 3
    inp = {k: v.to(device).requires_grad_(True) for k, v in _inputs(Nt, Nv, T, D).items()}
    noise = torch.randn(Nt, Nv, M, D, device=device)
    g = torch.randn(Nt, Nv, device=device)
    tol = GPU_TOL32 if device == "cuda" else GRAD_TOL32
    for kw in (dict(seed=4, pair_offset=(5, 2)), dict(prior="normal", noise=noise)):
        with tk.use_backend("triton"):
            s, b = tk.stochastic_max_similarity(**inp, num_samples=M, **kw)
        s_ref, b_ref = ref_smsim(**inp, num_samples=M, **kw)
        close(s, s_ref, **(GPU_TOL32 if device == "cuda" else {}))
        assert torch.equal(b, b_ref)
        got = torch.autograd.grad(s, list(inp.values()), g)
        want = torch.autograd.grad(s_ref, list(inp.values()), g)
        for name, x, y in zip(inp, got, want):
            torch.testing.assert_close(x, y, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_authors_radius_module():
    """Our reference's stochastic text (radius path + reparameterisation) against a mirror of
    the authors' LinearCosRadius/StochasticText, with the same injected noise."""
    Nt, Nv, T, D, M = 3, 4, 12, 32, 2
    inp = _inputs(Nt, Nv, T, D)
    noise = torch.rand(Nt, Nv, M, D)
    s, best = ref_smsim(**inp, num_samples=M, noise=noise)
    emb = tk.stochastic_text_embedding(inp["text"], inp["frames"], inp["radius_weight"],
                                       inp["radius_bias"], best, noise=noise)
    ii, jj = torch.meshgrid(torch.arange(Nt), torch.arange(Nv), indexing="ij")
    eps = noise[ii, jj, best]                                           # [Nt, Nv, D]
    theirs = authors_stochastic_text(inp["text"][ii.reshape(-1)], inp["frames"][jj.reshape(-1)],
                                     inp["radius_weight"], inp["radius_bias"],
                                     eps.reshape(-1, D)).reshape(Nt, Nv, D)
    # Their mean over T identical rows of a [T, T] matmul may differ from one dot product in
    # the last bit, so the radius agrees to float32 rounding rather than bit for bit.
    torch.testing.assert_close(emb, theirs, rtol=2e-6, atol=1e-6)
    # And the radius itself is theirs: exp(Linear(T -> D)(S)), no sqrt, no scalar.
    R = radius(inp["text"], inp["frames"], inp["radius_weight"], inp["radius_bias"])
    torch.testing.assert_close((theirs - inp["text"][:, None, :]) / eps, R, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prior", ["uniform", "normal"])
def test_embedding_helper_cosine_is_sims(prior):
    Nt, Nv = 4, 5
    inp = _inputs(Nt, Nv, 12, 20)
    with tk.use_backend("cpp"):
        s, best = tk.stochastic_max_similarity(**inp, num_samples=7, prior=prior, seed=31)
    emb = tk.stochastic_text_embedding(inp["text"], inp["frames"], inp["radius_weight"],
                                       inp["radius_bias"], best, prior=prior, seed=31)
    cos = F.cosine_similarity(emb, inp["pooled"].transpose(0, 1), dim=-1)
    close(cos, s, rtol=1e-5, atol=1e-6)
    pairs = torch.tensor([[0, 4], [3, 1], [2, 2]])
    sel = tk.stochastic_text_embedding(inp["text"], inp["frames"], inp["radius_weight"],
                                       inp["radius_bias"], best, pairs, prior=prior, seed=31)
    close(sel, emb[pairs[:, 0], pairs[:, 1]])
    with pytest.raises(ValueError, match="seed is required"):
        tk.stochastic_text_embedding(inp["text"], inp["frames"], inp["radius_weight"],
                                     inp["radius_bias"], best)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck(device):
    for backend in ["", "reference", *fused_backends(device, ("cpp", "triton"))]:
        # opcheck runs each op several times: a tiny problem for the interpreted triton
        Nt, Nv, T, D = (2, 2, 2, 5) if backend == "triton" and device == "cpu" else (3, 4, 5, 9)
        inp = {k: v.to(device).requires_grad_(True) for k, v in _inputs(Nt, Nv, T, D).items()}
        args = tuple(inp.values())
        best = torch.randint(0, 3, (Nt, Nv), device=device)
        torch.library.opcheck(torch.ops.tvr.stochastic_max_similarity.default,
                              (*args, 3, "uniform", 1.0, 7, None, 0, 0, backend))
        torch.library.opcheck(torch.ops.tvr.stochastic_max_similarity.default,
                              (*args, 3, "normal", 0.5, 7, torch.randn(Nt, Nv, 3, D, device=device),
                               2, 1, backend))
        if backend == "reference":
            # The reference backward runs functorch's vjp, which cannot see through opcheck's
            # schema-checking tensor wrappers; test_gradients_match_reference covers it.
            continue
        torch.library.opcheck(torch.ops.tvr.stochastic_max_similarity_backward.default,
                              (torch.randn(Nt, Nv, device=device), *[a.detach() for a in args],
                               best, 3, "uniform", 1.0, 7, None, 0, 0, backend))


def test_compile_fullgraph():
    inp = _inputs(3, 4, 12, 16, requires_grad=True)
    f = torch.compile(lambda *xs: tk.stochastic_max_similarity(*xs, 5, seed=17)[0] * 2.0,
                      fullgraph=True)
    y = f(*inp.values())
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, list(inp.values()), g)
    s_ref, _ = ref_smsim(**inp, num_samples=5, seed=17)
    close(y, s_ref * 2.0)
    want = torch.autograd.grad(s_ref * 2.0, list(inp.values()), g)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, rtol=1e-4, atol=1e-5)


def test_no_large_buffers(monkeypatch):
    """The cpp forward allocates nothing of size Nt*Nv*D (let alone Nt*Nv*M*D): every tensor
    it creates through torch is at most [Nt, Nv] plus dtype copies of the inputs."""
    Nt, Nv, T, D, M = 16, 16, 12, 64, 10
    inp = _inputs(Nt, Nv, T, D)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        with tk.use_backend("cpp"):
            tk.stochastic_max_similarity(**inp, num_samples=M, seed=1)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    limit = Nt * Nv * 8 * 4 + D * T * 4 * 4
    assert max(allocated, default=0) <= limit, max(allocated)


def _bad(**over):
    kw = dict(_inputs(2, 3, 4, 5), num_samples=3)
    kw.update(over)
    return kw


@pytest.mark.parametrize("kwargs,err,match", [
    (_bad(text=torch.randn(2, 6)), ValueError, r"frames is \[Nv, T, D\].*D must agree"),
    (_bad(frames=torch.randn(3, 4, 6)), ValueError, r"D must agree"),
    (_bad(pooled=torch.randn(3, 3, 5)), ValueError, r"pooled must be \[Nv, Nt, D\] = \(3, 2, 5\)"),
    (_bad(pooled=torch.randn(4, 2, 5)), ValueError, r"pooled must be \[Nv, Nt, D\]"),
    (_bad(radius_weight=torch.randn(5, 3)), ValueError, r"radius_weight must be \[D, T\] = \(5, 4\)"),
    (_bad(radius_weight=torch.randn(4, 4)), ValueError, r"radius_weight must be \[D, T\]"),
    (_bad(radius_bias=torch.randn(4)), ValueError, r"radius_bias must be \[D\] = \(5,\)"),
    (_bad(text=torch.randn(2, 3, 5)), ValueError, r"text must be 2-D \[Nt, D\]"),
    (_bad(frames=torch.randn(3, 5)), ValueError, r"frames must be 3-D \[Nv, T, D\]"),
    (_bad(num_samples=0), ValueError, "num_samples must be >= 1"),
    (_bad(num_samples=2.0), TypeError, "num_samples must be an int"),
    (_bad(prior="gaussian"), ValueError, "prior must be one of"),
    (_bad(prior="normal", std=0.0), ValueError, "std must be finite and > 0"),
    (_bad(std=-1.0), ValueError, "std must be finite and > 0"),
    (_bad(std=float("nan")), ValueError, "std must be finite and > 0"),
    (_bad(std=float("inf")), ValueError, "std must be finite and > 0"),
    (_bad(noise=torch.rand(2, 3, 4, 5)), ValueError, r"noise must be \[Nt, Nv, M, D\] = \(2, 3, 3, 5\)"),
    (_bad(noise=torch.rand(2, 3, 5)), ValueError, "noise must be 4-D"),
    (_bad(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (_bad(seed=1.5), TypeError, "seed must be an int or None"),
    (_bad(pooled=torch.randn(3, 2, 5, dtype=torch.float64)), TypeError, "one dtype.*pooled float64"),
    (_bad(text=torch.randint(0, 3, (2, 5))), TypeError, "text must have dtype"),
    (_bad(pair_offset=(-1, 0)), ValueError, r"pair_offset\[0\] must be >= 0"),
    (_bad(pair_offset=(0, 2 ** 32)), ValueError, "must be < 2\\*\\*32"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.stochastic_max_similarity(**kwargs)
    with pytest.raises(err, match=match):
        ref_smsim(**kwargs)
