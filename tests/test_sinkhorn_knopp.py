"""sinkhorn_knopp (SPEC 4): every backend against the reference, forward and backward, both
domains; the log domain against the probability domain and against float64 where the
authors' float32 version overflows; autograd, opcheck, torch.compile and bad input."""
import contextlib

import pytest
import torch

import tvr_kernels as tk
from tvr_kernels.ops.sinkhorn_knopp import NONFINITE_MESSAGE
from tvr_kernels.reference import sinkhorn_knopp as ref_sk

from conftest import DEVICES, fused_backends
from helpers import authors_sinkhorn as _authors, close

SHAPES = [(1, 1), (7, 3), (45, 13), (3, 100), (64, 37)]
ITERS = [1, 2, 4, 7]
EPS32 = torch.finfo(torch.float32).eps


def make_logits(Nq, Nv, kind, dtype=torch.float32, device="cpu"):
    """'ucofia': CLIP similarities (mean 0.25, sd 0.1, per-video offsets) times the logit
    scale 100, range ~50-80; 'small': standard normal logits."""
    if kind == "ucofia":
        sims = 0.25 + 0.1 * torch.randn(Nq, Nv) + 0.05 * torch.randn(1, Nv)
        x = 100.0 * sims.clamp(-1, 1)
    else:
        x = torch.randn(Nq, Nv)
    return x.to(dtype=dtype, device=device)


def tol32(x, n_iters, grad_scale=1.0):
    """float32 tolerance. Every update adds a few ulps of |logits| (the log-potentials are as
    large as the logits and are added to them before exp) to the absolute error of the
    potentials, and the biases and gradients inherit it (gradients times their scale)."""
    span = 1.0 + float(x.detach().abs().max())
    return dict(rtol=1e-4, atol=4 * EPS32 * span * (n_iters + 1) * grad_scale)


def run(backend, x, n_iters, log_domain, gr, gc):
    """(row, col, dlogits) of one backend for output gradients gr, gc."""
    x = x.detach().requires_grad_(True)
    if backend == "reference!":  # the plain reference function (not the op)
        row, col = ref_sk(x, n_iters, log_domain=log_domain)
    else:
        with tk.use_backend(backend):
            row, col = tk.sinkhorn_knopp(x, n_iters, log_domain=log_domain)
    (g,) = torch.autograd.grad([row, col], [x], [gr, gc])
    return row.detach(), col.detach(), g


def check_backend(backend, device, shape, n_iters, log_domain, kind, dtype=torch.float32):
    """Forward against the reference in the same dtype. Gradient against the reference's
    gradient in float64: in float32 the authors' probability-domain backward overflows (the
    derivative of b = 1/(a K) is -b^2, and b reaches e^range: b^2 > 3e38 once the logit range
    passes ~44, which UCoFiA-scale logits do), while ours is computed in log space."""
    x = make_logits(*shape, kind, dtype, device)
    gr = torch.randn(shape[0], dtype=dtype, device=device)
    gc = torch.randn(shape[1], dtype=dtype, device=device)
    row, col, g = run(backend, x, n_iters, log_domain, gr, gc)
    rr, cr, _ = run("reference!", x, n_iters, log_domain, gr, gc)
    _, _, gref = run("reference!", x.double(), n_iters, log_domain, gr.double(), gc.double())
    assert row.shape == (shape[0],) and col.shape == (shape[1],) and g.shape == shape
    assert row.dtype == col.dtype == g.dtype == dtype
    assert torch.isfinite(rr).all() and torch.isfinite(cr).all()  # inputs chosen in range
    if dtype == torch.float32:
        t = tol32(x, n_iters)
        tg = tol32(x, n_iters, grad_scale=1 + float(gr.abs().sum() + gc.abs().sum()) / 4)
        torch.testing.assert_close(row, rr, **t)
        torch.testing.assert_close(col, cr, **t)
        torch.testing.assert_close(g.double(), gref, **tg)
    else:
        span = 1.0 + float(x.abs().max())
        for a, b in [(row, rr), (col, cr), (g, gref)]:
            close(a, b, atol=1e-12 * span * (n_iters + 1) * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_iters", ITERS)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
@pytest.mark.parametrize("kind", ["ucofia", "small"])
def test_cpp_matches_reference(device, shape, n_iters, log_domain, kind):
    for backend in fused_backends(device, ("cpp",)):
        check_backend(backend, device, shape, n_iters, log_domain, kind)


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
@pytest.mark.parametrize("shape", [(301, 229), (1027, 67)], ids=str)
def test_cpp_parallel_chunks(shape, log_domain):
    """Shapes large enough for the C++ kernel to split rows across two threads (>= 32K logits
    a chunk), with row counts that leave partial row blocks and column counts that leave
    partial vector lanes."""
    if "cpp" not in fused_backends("cpu", ("cpp",)):
        pytest.skip("extension not built")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_backend("cpp", "cpu", shape, 3, log_domain, "ucofia")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 3), (45, 13), (3, 100)], ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_float64(device, shape, log_domain):
    for backend in ["reference", *fused_backends(device, ("cpp", "triton"))]:
        check_backend(backend, device, shape, 3, log_domain, "ucofia", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_cpp_half_types(dtype, log_domain):
    """Half logits are computed in float32 (reference and kernel) and rounded once."""
    if "cpp" not in fused_backends("cpu", ("cpp",)):
        pytest.skip("extension not built")
    x = make_logits(45, 13, "ucofia", dtype)
    gr, gc = torch.randn(45, dtype=dtype), torch.randn(13, dtype=dtype)
    row, col, g = run("cpp", x, 4, log_domain, gr, gc)
    rr, cr, gref = run("reference!", x, 4, log_domain, gr, gc)
    assert row.dtype == col.dtype == g.dtype == dtype
    for a, b in [(row, rr), (col, cr)]:
        close(a.float(), b.float(), dtype=dtype)
    # the gradient is O(|grad|): compare at the scale of the largest entry
    close(g.float(), gref.float(), dtype=dtype, atol=float(gref.abs().max()) * 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,n_iters", [((1, 1), 1), ((7, 3), 2), ((45, 13), 4), ((3, 100), 7)],
                         ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_triton_matches_reference(device, shape, n_iters, log_domain):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")
    check_backend("triton", device, shape, n_iters, log_domain, "ucofia")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_triton_gpu_blocks(monkeypatch, dtype, log_domain):
    """The GPU tile choice run in the interpreter: [70, 300] is 3 row blocks of 32 (the last
    one 6 real rows, the rest clamped) and 3 (float64: 5) column chunks, the last partial."""
    if "triton" not in fused_backends("cpu", ("triton",)):
        pytest.skip("triton interpreter unavailable")
    from tvr_kernels.triton import sinkhorn_knopp as tsk

    assert tsk._gpu_blocks(70, 300, dtype) == ((32, 128, 8) if dtype == torch.float32 else (32, 64, 8))
    monkeypatch.setattr(tsk, "_blocks", tsk._gpu_blocks)
    check_backend("triton", "cpu", (70, 300), 2, log_domain, "ucofia", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (45, 13), (3, 100), (45000, 1000), (1000, 45000),
                                   (45000, 1)], ids=str)
def test_triton_gpu_blocks_bounds(shape, dtype):
    """What the GPU tiles promise: at most 16 logits per thread (8 in float64, checked free of
    register spills at [45000, 1000]), warps only where they have work, and partials [cdiv(Nq, BLOCK_R), Nv] of at
    most Nq * Nv / 32 + Nv elements."""
    pytest.importorskip("triton")
    from tvr_kernels.triton import sinkhorn_knopp as tsk

    Nq, Nv = shape
    br, bv, nw = tsk._gpu_blocks(Nq, Nv, dtype)
    limit = 8 if dtype == torch.float64 else 16
    assert nw in (1, 2, 4, 8) and br * bv <= 32 * nw * limit
    assert nw == 1 or br * bv == 32 * nw * limit  # more warps only once each thread is full
    assert -(-Nq // br) * Nv <= Nq * Nv / 32 + Nv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_iters", [1, 4, 7])
def test_log_domain_agrees_with_probability_domain(dtype, n_iters):
    x = make_logits(64, 37, "ucofia", dtype)
    rp, cp = ref_sk(x, n_iters)
    rl, cl = ref_sk(x, n_iters, log_domain=True)
    assert torch.isfinite(rp).all() and torch.isfinite(cp).all()
    t = tol32(x, n_iters) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rl, rp, **t)
    torch.testing.assert_close(cl, cp, **t)


def _range_200_logits():
    """A bank whose logit range is 200: videos (columns) with offsets from -100 to +100, so
    that in float32 exp(logits - max) underflows to 0 over whole columns."""
    offsets = torch.linspace(-100.0, 100.0, 13)
    return (offsets[None, :] + 2.0 * torch.randn(40, 13)).float()


def test_range_200_log_domain_finite_and_correct():
    x = _range_200_logits()
    assert float(x.max() - x.min()) > 190
    # The authors' float32 iteration breaks down...
    rp, cp = ref_sk(x, 4)
    assert not (torch.isfinite(rp).all() and torch.isfinite(cp).all())
    # ... and a float64 evaluation of the same formula (exp underflows only below -745) is
    # the ground truth.
    r64, c64 = ref_sk(x.double(), 4)
    assert torch.isfinite(r64).all() and torch.isfinite(c64).all()
    gr, gc = torch.randn(40, dtype=torch.float64), torch.randn(13, dtype=torch.float64)
    _, _, g64 = run("reference!", x.double(), 4, False, gr, gc)
    for backend in ["reference!", "reference", *fused_backends("cpu")]:
        row, col, g = run(backend, x, 4, True, gr.float(), gc.float())
        assert torch.isfinite(row).all() and torch.isfinite(col).all() and torch.isfinite(g).all(), backend
        t = tol32(x, 4)
        torch.testing.assert_close(row.double(), r64, **t)
        torch.testing.assert_close(col.double(), c64, **t)
        torch.testing.assert_close(g.double(), g64, **tol32(x, 4, grad_scale=float(gr.abs().sum())))


def test_range_200_probability_domain_keeps_the_authors_quirk():
    """Our probability-domain op reproduces the authors' inf/NaN (documented), it does not
    silently switch to the log domain."""
    x = _range_200_logits()
    rp, cp = ref_sk(x, 4)
    for backend in fused_backends("cpu"):
        with tk.use_backend(backend):
            row, col = tk.sinkhorn_knopp(x, 4)
        assert not (torch.isfinite(row).all() and torch.isfinite(col).all()), backend
        assert torch.equal(torch.isfinite(col), torch.isfinite(cp)), backend


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_gradcheck_reference(log_domain):
    x = make_logits(6, 5, "small", torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ref_sk(t, 3, log_domain=log_domain), (x,))


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_gradcheck_fused(log_domain):
    x = make_logits(6, 5, "small", torch.float64).requires_grad_(True)
    for backend in fused_backends("cpu"):
        with tk.use_backend(backend):
            assert torch.autograd.gradcheck(lambda t: tk.sinkhorn_knopp(t, 3, log_domain=log_domain), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_only_column_bias_used(device):
    """UCoFiA uses col_bias only: the row output gets no gradient (None) and that works."""
    x = make_logits(9, 4, "ucofia", device=device).requires_grad_(True)
    gc = torch.randn(4, device=device)
    (gref,) = torch.autograd.grad(ref_sk(x, 4)[1], x, gc)
    for backend in fused_backends(device):
        with tk.use_backend(backend):
            _, col = tk.sinkhorn_knopp(x, 4)
        (g,) = torch.autograd.grad(col, x, gc)
        torch.testing.assert_close(g, gref, **tol32(x, 4, grad_scale=float(gc.abs().sum())))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = make_logits(7, 5, "ucofia", device=device).requires_grad_(True)
    backends = ["", "reference", *fused_backends(device, ("cpp",))]
    for backend in backends:
        for log_domain in (False, True):
            torch.library.opcheck(torch.ops.tvr.sinkhorn_knopp.default, (x, 3, log_domain, backend))
            _, _, f, g = torch.ops.tvr.sinkhorn_knopp(x.detach(), 3, log_domain, backend)
            args = (torch.randn(7, device=device), torch.randn(5, device=device), x.detach(), f, g, 3,
                    log_domain, backend)
            if backend != "reference":
                # Not the reference backward: it runs torch.func.vjp, whose wrapped tensors
                # opcheck's schema check cannot inspect (the other ops' tests skip it too).
                torch.library.opcheck(torch.ops.tvr.sinkhorn_knopp_backward.default, args)


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_compile_fullgraph(log_domain):
    x = make_logits(45, 13, "ucofia").requires_grad_(True)

    def f(t):
        row, col = tk.sinkhorn_knopp(t * 1.0, 4, log_domain=log_domain)
        return row * 2.0, col + 1.0

    y = torch.compile(f, fullgraph=True)(x)
    gr, gc = torch.randn(45), torch.randn(13)
    (g,) = torch.autograd.grad(y, x, (gr, gc))
    rr, cr = ref_sk(x, 4, log_domain=log_domain)
    (gref,) = torch.autograd.grad((rr * 2.0, cr + 1.0), x, (gr, gc))
    torch.testing.assert_close(y[0], rr * 2.0, **tol32(x, 4, 2.0))
    torch.testing.assert_close(y[1], cr + 1.0, **tol32(x, 4))
    torch.testing.assert_close(g, gref, **tol32(x, 4, float(gr.abs().sum() + gc.abs().sum())))


def test_backward_outside_backend_block_uses_forward_backend():
    x = make_logits(7, 3, "ucofia").requires_grad_(True)
    with tk.use_backend("reference"):
        row, col = tk.sinkhorn_knopp(x, 2)
    (row.sum() + (col * torch.arange(3.0)).sum()).backward()
    rr, cr = ref_sk(x, 2)
    (gr,) = torch.autograd.grad(rr.sum() + (cr * torch.arange(3.0)).sum(), x)
    torch.testing.assert_close(x.grad, gr, rtol=0, atol=0)  # the same reference code ran


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(logits=torch.randn(5)), ValueError, r"logits must be 2-D \[Nq, Nv\]"),
    (dict(logits=torch.randn(2, 3, 4)), ValueError, r"logits must be 2-D \[Nq, Nv\]"),
    (dict(logits=torch.randn(0, 4)), ValueError, "logits must be non-empty"),
    (dict(logits=torch.randn(4, 0)), ValueError, "logits must be non-empty"),
    (dict(logits=torch.randint(0, 5, (4, 3))), TypeError, "logits must have dtype"),
    (dict(logits=[[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
    (dict(logits=torch.randn(4, 3), n_iters=0), ValueError, "n_iters must be >= 1"),
    (dict(logits=torch.randn(4, 3), n_iters=-2), ValueError, "n_iters must be >= 1"),
    (dict(logits=torch.randn(4, 3), n_iters=2.0), TypeError, "n_iters must be an int"),
    (dict(logits=torch.randn(4, 3), n_iters=True), TypeError, "n_iters must be an int"),
    (dict(logits=torch.randn(4, 3), log_domain=1), TypeError, "log_domain must be a bool"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.sinkhorn_knopp(**kwargs)
    with pytest.raises(err, match=match):
        ref_sk(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_nonfinite_logits(bad, log_domain):
    """The op raises (every backend, eager and compiled); the plain reference propagates
    NaN / +inf (documented): its result is not finite."""
    x = make_logits(9, 4, "ucofia")
    x[3, 2] = bad
    for backend in ["reference", *fused_backends("cpu")]:
        with tk.use_backend(backend):
            with pytest.raises(ValueError, match="logits contain NaN or"):
                tk.sinkhorn_knopp(x, 3, log_domain=log_domain)
    with pytest.raises(ValueError, match="logits contain NaN or"):
        torch.compile(lambda t: tk.sinkhorn_knopp(t, 3, log_domain=log_domain), fullgraph=True)(x)
    row, col = ref_sk(x, 3, log_domain=log_domain)
    if bad == float("-inf"):
        # The reference treats -inf as a zero of K (a mask); the op asks for a finite mask.
        assert "large finite negative value instead of -inf" in NONFINITE_MESSAGE
    else:
        assert not (torch.isfinite(row).all() and torch.isfinite(col).all())


# ---------------------------------------------------------------- row mass Nv / Nq (issue 11)
# The authors' updates ask for row sums 1 and column sums 1 in turn, which disagree unless
# Nq = Nv: their scalings drift by Nq / Nv per iteration and overflow on long or very
# non-square runs. Every backend asks for row sums Nv / Nq instead (reference module
# docstring): the same biases, finite for any number of iterations.


@contextlib.contextmanager
def _threads(n):
    """torch.set_num_threads(n) for the block, restored afterwards. Long runs take one thread:
    thousands of small ops, whose parallel regions cost more than they save (on a loaded
    2-core machine, 2000 iterations at [300, 200] took 40 s on two threads, 0.6 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bank(Nq, Nv, dtype=torch.float32):
    """Logits spanning ~25 (a range where exp never underflows): only the row mass can make
    the authors' iteration overflow."""
    return (25.0 + 3.0 * torch.randn(Nq, Nv, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,n_iters", [((37, 37), 4), ((37, 37), 30), ((64, 37), 4), ((45, 60), 7)],
                         ids=str)
@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_reference_equals_the_authors_iteration(dtype, shape, n_iters, log_domain):
    """Where the authors' iteration is finite the reference gives its biases: bitwise for
    square logits in the probability domain (the row mass is 1), to rounding otherwise."""
    x = make_logits(*shape, "ucofia", dtype)
    ra, ca = _authors(x, n_iters)
    assert torch.isfinite(ra).all() and torch.isfinite(ca).all()
    row, col = ref_sk(x, n_iters, log_domain=log_domain)
    if shape[0] == shape[1] and not log_domain:
        assert torch.equal(row, ra) and torch.equal(col, ca)
    t = tol32(x, n_iters) if dtype == torch.float32 else dict(rtol=0, atol=1e-13 * (n_iters + 1))
    torch.testing.assert_close(row, ra, **t)
    torch.testing.assert_close(col, ca, **t)


def test_authors_iteration_overflows_where_ours_does_not():
    """Why the row mass: [57, 1000] x 40 in float32 and [300, 200] x 2000 in float64 are
    inf/NaN in the authors' iteration, from logits spanning only ~25."""
    for x, n_iters in [(_bank(57, 1000), 40), (_bank(300, 200, torch.float64), 2000)]:
        with _threads(1):
            ra, ca = _authors(x, n_iters)
            row, col = ref_sk(x, n_iters)
        assert not (torch.isfinite(ra).all() and torch.isfinite(ca).all())
        assert torch.isfinite(row).all() and torch.isfinite(col).all()


def _truth(x, n_iters):
    """The biases computed in float64 in the log domain (one thread: see _threads)."""
    with _threads(1):
        return ref_sk(x.double(), n_iters, log_domain=True)


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_nonsquare_40_iterations_float32_every_backend(log_domain):
    """[57, 1000] x 40 in float32: finite on every backend and equal to float64 (measured
    errors <= 3e-6), gradient included (the interpreter's: test_triton_nonsquare_long_run).
    In float64 the authors' own iteration is still finite here (its scalings reach e^115):
    the float64 log domain equals it."""
    x = _bank(57, 1000)
    gr, gc = torch.randn(57, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    with _threads(1):
        r64, c64, g64 = run("reference!", x.double(), 40, True, gr, gc)
        ra, ca = _authors(x.double(), 40)
    torch.testing.assert_close(r64, ra, rtol=0, atol=1e-12)
    torch.testing.assert_close(c64, ca, rtol=0, atol=1e-12)
    for backend in ["reference!", "reference", *fused_backends("cpu")]:
        if backend == "triton":
            with tk.use_backend("triton"):
                row, col = tk.sinkhorn_knopp(x, 40, log_domain=log_domain)
        else:
            with _threads(1):
                row, col, g = run(backend, x, 40, log_domain, gr.float(), gc.float())
            # |g| up to ~3; measured errors 4e-6 (C++), 2e-5 (float32 autograd of the log domain)
            torch.testing.assert_close(g.double(), g64, rtol=0, atol=5e-5, msg=backend)
        assert torch.isfinite(row).all() and torch.isfinite(col).all(), backend
        torch.testing.assert_close(row.double(), r64, rtol=0, atol=1e-5, msg=backend)
        torch.testing.assert_close(col.double(), c64, rtol=0, atol=1e-5, msg=backend)


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_nonsquare_float64_2000_iterations(log_domain):
    """[300, 200] x 2000 in float64 (the authors' overflows): finite, and both domains and
    the reference and C++ kernel agree to float64 rounding."""
    x = _bank(300, 200, torch.float64)
    with _threads(1):
        r64, c64 = ref_sk(x, 2000)
    for backend in ["reference", *fused_backends("cpu", ("cpp",))]:
        with tk.use_backend(backend), _threads(1):
            row, col = tk.sinkhorn_knopp(x, 2000, log_domain=log_domain)
        assert torch.isfinite(row).all() and torch.isfinite(col).all(), backend
        torch.testing.assert_close(row, r64, rtol=0, atol=1e-12, msg=backend)
        torch.testing.assert_close(col, c64, rtol=0, atol=1e-12, msg=backend)


def test_log_domain_long_run_precision():
    """Log domain, [57, 1000] x 2000 in float32: the potentials converge instead of growing
    by 2000 ln(1000 / 57) ~ 5700, so the biases stay within a few float32 ulps of their size
    (~7) of float64: measured 6e-7 (rows) and 2.6e-6 (columns); unrescaled: 2.8e-4 / 5.6e-4.
    The gradient likewise against the C++ kernel in float64."""
    x = _bank(57, 1000)
    r64, c64 = _truth(x, 2000)
    for backend in ["reference", *fused_backends("cpu", ("cpp",))]:
        with tk.use_backend(backend), _threads(1):
            row, col = tk.sinkhorn_knopp(x, 2000, log_domain=True)
        torch.testing.assert_close(row.double(), r64, rtol=0, atol=5e-6, msg=backend)
        torch.testing.assert_close(col.double(), c64, rtol=0, atol=1e-5, msg=backend)
    if "cpp" in fused_backends("cpu", ("cpp",)):
        gr, gc = torch.randn(57, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
        with _threads(1):
            _, _, g = run("cpp", x, 2000, True, gr.float(), gc.float())
            _, _, g64 = run("cpp", x.double(), 2000, True, gr, gc)
        torch.testing.assert_close(g.double(), g64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_triton_nonsquare_long_run(log_domain):
    """The interpreter at a small, very non-square shape: [3, 100] x 60 overflows the
    authors' float32 iteration after ~25; ours is finite and equal to float64."""
    if "triton" not in fused_backends("cpu", ("triton",)):
        pytest.skip("triton interpreter unavailable")
    x = _bank(3, 100)
    ra, ca = _authors(x, 60)
    assert not (torch.isfinite(ra).all() and torch.isfinite(ca).all())
    r64, c64 = _truth(x, 60)
    gr, gc = torch.randn(3), torch.randn(100)
    _, _, gref = run("reference!", x.double(), 60, False, gr.double(), gc.double())
    row, col, g = run("triton", x, 60, log_domain, gr, gc)
    torch.testing.assert_close(row.double(), r64, rtol=0, atol=1e-5)
    torch.testing.assert_close(col.double(), c64, rtol=0, atol=1e-5)
    torch.testing.assert_close(g.double(), gref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
def test_gradcheck_nonsquare(log_domain):
    """The analytic backward takes kappa = ln(Nv / Nq) out of the row update's plan: float64
    gradcheck at a row mass far from 1 (Nv / Nq = 17 / 3), over enough iterations that the
    unrescaled potentials would have moved by 20 ln(17 / 3) ~ 35, on the reference and the
    C++ kernel. (Triton: test_gradcheck_fused at 5 / 6 and test_triton_nonsquare_long_run's
    gradient; gradcheck here takes ~30 s in the interpreter.)"""
    x = make_logits(3, 17, "small", torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ref_sk(t, 20, log_domain=log_domain), (x,))
    for backend in fused_backends("cpu", ("cpp",)):
        with tk.use_backend(backend):
            assert torch.autograd.gradcheck(lambda t: tk.sinkhorn_knopp(t, 20, log_domain=log_domain),
                                            (x,)), backend


@pytest.mark.parametrize("log_domain", [False, True], ids=["prob", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_thread_count_independent(log_domain, dtype):
    """Row chunks depend on the shape only: [256, 300] (3 chunks of ~32K logits) gives bitwise
    the same forward and backward on 1 and 2 threads."""
    if "cpp" not in fused_backends("cpu", ("cpp",)):
        pytest.skip("extension not built")
    x = make_logits(256, 300, "ucofia", dtype)
    gr, gc = torch.randn(256, dtype=dtype), torch.randn(300, dtype=dtype)
    out = []
    for n in (1, 2):
        with _threads(n):
            out.append(run("cpp", x, 7, log_domain, gr, gc))
    for a, b in zip(*out):
        assert torch.equal(a, b)
