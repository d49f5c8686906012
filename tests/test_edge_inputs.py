"""Edge inputs (issue 11): size-0 dimensions on every op and backend, and inputs that once
crashed the process."""
from typing import Callable, NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tvr_kernels as tk
from tvr_kernels import _backend
from tvr_kernels.reference import stochastic_max_similarity as ref_smsim

from conftest import fused_backends
from helpers import close


@pytest.mark.skipif(not _backend.extension_available(), reason="C++ extension not built")
@pytest.mark.parametrize("kw", [dict(seed=0), dict(noise="given"), dict(hard=True)])
def test_perturbed_topk_empty_batch_cpp(kw):
    """An empty last chunk of an evaluation: the C++ kernel divided by b (SIGFPE)."""
    if kw.get("noise") == "given":
        kw = dict(noise=torch.randn(0, 8, 10))
    s = torch.randn(0, 10, requires_grad=True)
    with tk.use_backend("cpp"):
        y = tk.perturbed_topk(s, k=2, num_samples=8, **kw)
        y.sum().backward()
    assert y.shape == (0, 2, 10) and y.dtype == torch.float32
    assert s.grad.shape == (0, 10)


def _tmass_inputs(Nt=3, Nv=2, T=4, D=6):
    return (torch.randn(Nt, D), torch.randn(Nv, T, D), torch.randn(D, T), torch.randn(D))


@pytest.mark.parametrize("bad, err, match", [
    (lambda b: b.float(), TypeError, "best must be an int64 tensor"),
    (lambda b: b - 5, ValueError, "sample indices >= 0"),
    (lambda b: b + 2 ** 32, ValueError, "< 2\\*\\*32"),
    (lambda b: b[:1], ValueError, r"best must be \[Nt, Nv\]"),
])
def test_stochastic_text_embedding_rejects_bad_best(bad, err, match):
    text, frames, w, b = _tmass_inputs()
    best = torch.randint(0, 3, (3, 2))
    with pytest.raises(err, match=match):
        tk.stochastic_text_embedding(text, frames, w, b, bad(best), seed=0)


def test_stochastic_text_embedding_rejects_best_past_noise():
    text, frames, w, b = _tmass_inputs()
    noise = torch.rand(3, 2, 4, 6)
    with pytest.raises(ValueError, match="noise has M = 4"):
        tk.stochastic_text_embedding(text, frames, w, b, torch.full((3, 2), 4), noise=noise)


def test_stochastic_max_similarity_rejects_empty_embedding():
    """D = 0 gave NaN, -inf or 0 depending on the backend."""
    text, frames, w, b = _tmass_inputs(D=0)
    with pytest.raises(ValueError, match="D = 0"):
        tk.stochastic_max_similarity(text, frames, torch.randn(2, 3, 0), w, b, 4, seed=0)


# ------------------------------------------------------------------------------ size-0 sweep
# Every op, every backend: each dimension set to 0 in turn either works (result of the right
# empty shape, a backward giving gradients of the inputs' shapes, the same values on every
# backend) or raises a ValueError naming the argument, before any tvr op runs. Empty batches
# work (an evaluation's last chunk can be empty); an empty reduced axis (ISA's n, Bi-ISA's L
# and P, Sinkhorn's whole matrix), an empty cosine (T-MASS's D), or k, num_samples or
# num_frames = 0 has no meaningful result and is an error.

BACKENDS = ["reference", *fused_backends("cpu", ("cpp", "triton"))]


class Case(NamedTuple):
    sizes: dict     # every dimension, each >= 1
    make: Callable  # sizes -> (fn, inputs): fn(*inputs) is a tuple of the op's outputs
    shapes: Callable  # sizes -> the outputs' shapes
    errors: dict    # dimension -> regex of the ValueError raised when it is 0; others work
    dims: tuple = ()  # the dimensions swept (default: all of sizes)


def _r(*shape):
    return torch.randn(*shape)


def _token_shift(four_d):
    def make(s):
        B, T, N, C = s["B"], s["T"], s["N"], s["C"]
        x = _r(B, T, N, C) if four_d else _r(B * T, N, C)
        return (lambda x: (tk.token_shift(x, T),)), [x]

    def shapes(s):
        B, T, N, C = s["B"], s["T"], s["N"], s["C"]
        return [(B, T, N, C) if four_d else (B * T, N, C)]
    return Case(dict(B=2, T=3, N=8, C=4), make, shapes,
                dict(T="num_frames must be >= 1", N=r"N = 0 tokens \(x.shape\[-2\]\)"))


def _perturbed_topk(**kw):
    def make(s):
        b, d, k, S = s["b"], s["d"], s["k"], s["S"]
        extra = dict(kw)
        if extra.get("noise") == "given":
            extra["noise"] = _r(b, S, d)
        return (lambda x: (tk.perturbed_topk(x, k, S, **extra),)), [_r(b, d)]
    return Case(dict(b=3, d=10, k=2, S=8), make, lambda s: [(s["b"], s["k"], s["d"])],
                dict(d=r"k must be <= d = scores.shape\[1\] = 0", k="k must be >= 1",
                     S="num_samples must be >= 1"))


def _isa():
    def make(s):
        return (lambda x, w: (tk.isa(x, w, dim=1),)), [_r(s["a"], s["n"], s["c"]), _r(s["n"], s["n"])]
    return Case(dict(a=3, n=4, c=5), make, lambda s: [(s["a"], s["c"])],
                dict(n=r"sim.shape\[dim\] \(the reduced axis\) must be >= 1"))


def _bi_isa():
    def make(s):
        Bt, L, Bv, P, D = s["Bt"], s["L"], s["Bv"], s["P"], s["D"]
        inputs = [_r(Bt, L, D), _r(Bv, P, D), _r(L, L), _r(P, P), _r(L, L), _r(P, P)]
        return (lambda *xs: (tk.bi_isa(*xs),)), inputs
    # D = 0 works: G is a sum over an empty axis (0), well defined, unlike a cosine.
    return Case(dict(Bt=2, L=3, Bv=2, P=4, D=5), make, lambda s: [(s["Bt"], s["Bv"])],
                dict(L=r"L \(words.shape\[1\]\).* must be >= 1",
                     P=r"P \(patches.shape\[1\]\) must be >= 1"))


def _sinkhorn_knopp():
    def make(s):
        return (lambda x: tk.sinkhorn_knopp(x, 3)), [_r(s["Nq"], s["Nv"])]
    # Both biases are log_softmaxes over the whole axis: no empty chunk of it means anything.
    return Case(dict(Nq=3, Nv=4), make, lambda s: [(s["Nq"],), (s["Nv"],)],
                dict(Nq=r"logits must be non-empty \[Nq, Nv\]", Nv=r"logits must be non-empty"))


_TMASS_SIZES = dict(Nt=3, Nv=2, T=4, D=6, M=3)
_TMASS_ERRORS = dict(D=r"text is \[Nt, D\] with D = 0")


def _tmass_inputs_of(s):
    Nt, Nv, T, D = s["Nt"], s["Nv"], s["T"], s["D"]
    return [_r(Nt, D), _r(Nv, T, D), _r(Nv, Nt, D), _r(D, T) * 0.3, _r(D) * 0.3]


def _stochastic_max_similarity(source):
    def make(s):
        kw = dict(noise=torch.rand(s["Nt"], s["Nv"], s["M"], s["D"])) if source == "noise" \
            else dict(prior=source, seed=5)
        return (lambda *xs: tk.stochastic_max_similarity(*xs, s["M"], **kw)), _tmass_inputs_of(s)
    # T = 0 works: no frames, so S is empty and R = exp(radius_bias).
    return Case(_TMASS_SIZES, make, lambda s: [(s["Nt"], s["Nv"])] * 2,
                dict(_TMASS_ERRORS, M="num_samples must be >= 1"))


def _stochastic_text_embedding(source, with_pairs):
    def make(s):
        Nt, Nv, M, D = s["Nt"], s["Nv"], s["M"], s["D"]
        best = torch.randint(0, max(M, 1), (Nt, Nv))
        pairs = None
        if with_pairs:
            pairs = torch.stack([torch.randint(0, Nt, (s["P"],)), torch.randint(0, Nv, (s["P"],))], 1)
        kw = dict(noise=torch.rand(Nt, Nv, M, D)) if source == "noise" else dict(seed=5)
        text, frames, _, w, b = _tmass_inputs_of(s)
        return (lambda *xs: (tk.stochastic_text_embedding(*xs, best, pairs, **kw),)), \
            [text, frames, w, b]

    def shapes(s):
        return [(s["P"], s["D"]) if with_pairs else (s["Nt"], s["Nv"], s["D"])]
    errors = dict(_TMASS_ERRORS)
    if source == "noise":
        errors["M"] = r"noise is \[Nt, Nv, M, D\] = .* with M = 0"
    # With pairs, Nt or Nv = 0 leaves no pair to index: the pairs case sweeps P instead.
    dims = ("T", "D", "P", "M") if with_pairs else ("Nt", "Nv", "T", "D", "M")
    if source != "noise":
        dims = tuple(d for d in dims if d != "M")  # M is the noise's only: seeded has none
    return Case(dict(_TMASS_SIZES, P=4), make, shapes, errors, dims)


CASES = {
    "token_shift": _token_shift(four_d=False),
    "token_shift_4d": _token_shift(four_d=True),
    "perturbed_topk": _perturbed_topk(seed=0),
    "perturbed_topk_gumbel": _perturbed_topk(seed=0, distribution="gumbel"),
    "perturbed_topk_noise": _perturbed_topk(noise="given"),
    "perturbed_topk_hard": _perturbed_topk(hard=True),
    "isa": _isa(),
    "bi_isa": _bi_isa(),
    "sinkhorn_knopp": _sinkhorn_knopp(),
    "stochastic_max_similarity": _stochastic_max_similarity("uniform"),
    "stochastic_max_similarity_normal": _stochastic_max_similarity("normal"),
    "stochastic_max_similarity_noise": _stochastic_max_similarity("noise"),
    "stochastic_text_embedding": _stochastic_text_embedding("seed", with_pairs=False),
    "stochastic_text_embedding_pairs": _stochastic_text_embedding("seed", with_pairs=True),
    "stochastic_text_embedding_noise": _stochastic_text_embedding("noise", with_pairs=True),
}
SWEEP = [(name, dim) for name, case in CASES.items() for dim in (case.dims or case.sizes)]


class _TvrOps(TorchDispatchMode):
    """Records every tvr / tvr_C op dispatched inside the block (the kernels run inside them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("tvr", "tvr_C"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_op_recorder_sees_tvr_ops():
    """The recorder the sweep uses to prove that errors come before any kernel."""
    with _TvrOps() as rec, tk.use_backend("reference"):
        tk.token_shift(torch.randn(6, 8, 4), 3)
    assert rec.ops == ["tvr.token_shift.default"]


@pytest.mark.parametrize("name, dim", SWEEP, ids=[f"{n}-{d}" for n, d in SWEEP])
def test_size_zero(name, dim):
    case = CASES[name]
    sizes = dict(case.sizes, **{dim: 0})
    fn, inputs = case.make(sizes)
    want_error = case.errors.get(dim)
    first = None
    for backend in BACKENDS:
        xs = [x.clone().requires_grad_(True) for x in inputs]
        if want_error is not None:
            with pytest.raises(ValueError, match=want_error), _TvrOps() as rec:
                with tk.use_backend(backend):
                    fn(*xs)
            assert not rec.ops, f"{backend}: {rec.ops} ran before the error"
            continue
        with tk.use_backend(backend):
            outs = fn(*xs)
            assert [tuple(o.shape) for o in outs] == [tuple(s) for s in case.shapes(sizes)], backend
            floats = [o for o in outs if o.is_floating_point()]
            # materialize: at T = 0 the plain-torch embedding helper never reads frames (a
            # None gradient of an input the result does not depend on means zeros)
            grads = torch.autograd.grad(floats, xs, [torch.ones_like(o) for o in floats],
                                        allow_unused=True, materialize_grads=True)
        assert [g.shape for g in grads] == [x.shape for x in xs], backend
        if first is None:
            first = outs, grads
            continue
        for got, want in zip((*outs, *grads), (*first[0], *first[1])):
            if got.is_floating_point():
                close(got, want, msg=f"{backend} against {BACKENDS[0]}")
            else:
                assert torch.equal(got, want), backend


# ------------------------------------------------------------------------------ NaN in T-MASS
def _nan_pairs_inputs(source):
    """Inputs whose pairs of text 1 (all-zero row: 0/0 cosines), text 2 (a NaN) and pair
    (0, 1) (a NaN in pooled) are NaN in every sample; with injected noise, pair (0, 2) is NaN
    in samples 2 and 4 only and pair (3, 0) in sample 0 only."""
    text, frames, pooled, w, b = _tmass_inputs_of(dict(Nt=4, Nv=3, T=2, D=5))
    text[1] = 0.0
    text[2, 3] = float("nan")
    pooled[1, 0, 2] = float("nan")
    kw = dict(seed=3)
    if source == "noise":
        noise = torch.rand(4, 3, 5, 5)
        noise[0, 2, 2, 1] = noise[0, 2, 4, 0] = noise[3, 0, 0, 4] = float("nan")
        kw = dict(noise=noise)
    return (text, frames, pooled, w, b), kw


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter 0/0
@pytest.mark.parametrize("source", ["seed", "noise"])
def test_stochastic_max_similarity_nan_rows_agree(source):
    """A NaN or all-zero row scores NaN on every backend, with torch.max's index (the first
    NaN sample): Triton used to give -inf and best = 0, ranking a bad row silently last."""
    inputs, kw = _nan_pairs_inputs(source)
    s_ref, b_ref = ref_smsim(*inputs, 5, **kw)
    nan = torch.zeros(4, 3, dtype=torch.bool)
    nan[1] = nan[2] = True
    nan[0, 1] = True
    if source == "noise":
        nan[0, 2] = nan[3, 0] = True
        assert b_ref[0, 2] == 2 and b_ref[3, 0] == 0
    assert torch.equal(s_ref.isnan(), nan)
    assert torch.equal(b_ref[1], torch.zeros(3, dtype=torch.int64))
    for backend in BACKENDS:
        with tk.use_backend(backend):
            s, b = tk.stochastic_max_similarity(*inputs, 5, **kw)
        torch.testing.assert_close(s, s_ref, equal_nan=True, msg=backend)
        assert torch.equal(b, b_ref), backend


# ------------------------------------------------------------------------------ double backward
# token_shift is differentiable to any order (tests/test_token_shift.py); the other ops have
# first-order gradients only and say so when differentiated twice.
DOUBLE_BACKWARD = {
    "isa": (lambda x, w: tk.isa(x, w), lambda: [_r(3, 4), _r(4, 4)]),
    "bi_isa": (lambda *xs: tk.bi_isa(*xs),
               lambda: [_r(2, 3, 5), _r(2, 4, 5), _r(3, 3), _r(4, 4), _r(3, 3), _r(4, 4)]),
    "stochastic_max_similarity": (lambda *xs: tk.stochastic_max_similarity(*xs, 3, seed=0)[0],
                                  lambda: _tmass_inputs_of(dict(Nt=2, Nv=2, T=2, D=5))),
    "perturbed_topk": (lambda x: tk.perturbed_topk(x, 2, 8, seed=0), lambda: [_r(3, 6)]),
    "sinkhorn_knopp": (lambda x: tk.sinkhorn_knopp(x, 3)[1], lambda: [_r(3, 4)]),
}


@pytest.mark.parametrize("name", DOUBLE_BACKWARD)
def test_double_backward_says_unsupported(name):
    fn, make = DOUBLE_BACKWARD[name]
    inputs = make()
    for backend in BACKENDS:
        xs = [x.clone().requires_grad_(True) for x in inputs]
        with tk.use_backend(backend):
            y = fn(*xs)
            # y * y: the output gradient depends on the inputs, so every op's backward is
            # differentiated (not only those whose gradient depends on the inputs directly)
            grads = torch.autograd.grad((y * y).sum(), xs, create_graph=True)
            with pytest.raises(NotImplementedError,
                               match=f"tvr::{name}: double backward is not supported"):
                torch.autograd.grad(sum((g * g).sum() for g in grads), xs, allow_unused=True)
