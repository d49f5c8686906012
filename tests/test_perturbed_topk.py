"""perturbed_topk (SPEC 2): reference against the authors' computation, every backend against
the reference (injected noise: forward bit-exact; seeded noise: equal up to near-ties of the
noise transform's rounding), the gradient estimator against finite differences, hard mode,
op registration, compile, and every bad input."""
import pytest
import torch

import tvr_kernels as tk
from tvr_kernels import _backend
from tvr_kernels.reference import perturbed_topk as ref_topk
from tvr_kernels.reference.perturbed_topk import _forward_pieces as ref_topk_pieces
from tvr_kernels.reference.perturbed_topk import full_jacobian as ref_full_jacobian
from tvr_kernels.reference.perturbed_topk import perturbed_topk_noise

from conftest import DEVICES, fused_backends
from helpers import randn

HAVE_EXT = _backend.extension_available()
FUSED = fused_backends("cpu", ("cpp", "triton"))
ALL = ["reference", *FUSED]
# Tests of the triton backend also run on cuda when there is one: these variants are collected
# everywhere and skipped without a device (DEVICES has no cuda then).
DEVICE_PARAMS = [pytest.param(d, marks=pytest.mark.skipif(d not in DEVICES,
                                                          reason="no CUDA device"))
                 for d in ("cpu", "cuda")]
# Seeds whose low or high key word is 1 (Triton would specialise such an argument to a constexpr).
SEEDS = [1, 2 ** 32 + 7]

# (b, d, k, S): the papers' d = 49 (N = 50 minus CLS) and d = 196 (197 minus CLS), odd sizes,
# b = 1, k = 1, k = d, S = 1, d = 1.
SHAPES = [
    (4, 49, 3, 24),
    (2, 196, 3, 6),
    (3, 13, 1, 7),
    (1, 11, 11, 5),
    (5, 7, 2, 1),
    (2, 1, 1, 3),
    (3, 50, 7, 9),
]
# Triton runs in the interpreter here: small shapes only (b <= 3, S <= 16).
TRITON_SHAPES = [(2, 49, 3, 16), (1, 196, 3, 4), (3, 13, 13, 5), (2, 1, 1, 3)]


def _backends_for(shape, backends=None, device="cpu"):
    """The backends to test at ``shape`` on ``device`` (``backends`` defaults to the fused
    ones that run there; the interpreted triton only at small shapes)."""
    b, d, k, S = shape
    out = []
    for be in backends or fused_backends(device, ("cpp", "triton")):
        if be == "triton" and device == "cpu" and (b > 3 or S > 16):
            continue
        if _backend._why_unavailable(be) is not None or (be == "cpp" and device != "cpu"):
            continue
        if be == "triton" and "triton" not in fused_backends(device, ("triton",)):
            continue
        out.append(be)
    return out


def _skip_unless_runs(backend, device):
    if backend != "reference" and backend not in fused_backends(device, ("cpp", "triton")):
        pytest.skip(f"{backend} does not run on {device} here")


def _gumbel_noise(*shape):
    u = torch.rand(*shape).clamp_(1e-7, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def _noise(shape, distribution, device="cpu"):
    b, d, k, S = shape
    z = torch.randn(b, S, d) if distribution == "normal" else _gumbel_noise(b, S, d)
    return z.to(device)


def _assert_no_boundary_ties(scores, noise, sigma, k):
    """The k-th and (k+1)-th perturbed scores differ everywhere, so the selection is defined
    (torch.topk leaves exact ties unspecified): keeps bit-exact comparisons meaningful."""
    if k == scores.shape[1]:
        return
    p = scores.float()[:, None, :] + noise * sigma if scores.dtype != torch.float64 else \
        scores[:, None, :] + noise * sigma
    top = torch.topk(p, k + 1, dim=-1).values
    assert (top[..., k - 1] > top[..., k]).all()


def _run(backend, scores, k, S, sigma, grad, **kw):
    x = scores.detach().requires_grad_(True)
    if backend == "reference":
        y = ref_topk(x, k, S, sigma, **kw)
    else:
        with tk.use_backend(backend):
            y = tk.perturbed_topk(x, k, S, sigma, **kw)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y, gx


def _authors(scores, k, S, sigma, noise):
    """TS2-Net's PerturbedTopK written out plainly: forward and the gradient its backward
    returns for output gradient `grad`."""
    b, d = scores.shape
    perturbed_x = scores[:, None, :] + noise * sigma
    indices = torch.topk(perturbed_x, k=k, dim=-1, sorted=False).indices
    indices = torch.sort(indices, dim=-1).values
    perturbed_output = torch.nn.functional.one_hot(indices, num_classes=d).float()
    indicators = perturbed_output.mean(dim=1)

    def backward(grad):
        expected_gradient = torch.einsum("bnkd,bnd->bkd", perturbed_output, noise) / S / sigma
        return torch.einsum("bkd,bkd->bd", grad, expected_gradient)
    return indicators, backward


# ---------------------------------------------------------------- reference vs the authors

@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_reference_is_the_authors_computation(shape):
    b, d, k, S = shape
    scores = randn(b, d)
    noise = torch.normal(mean=0.0, std=1.0, size=(b, S, d))  # how the authors draw it
    want, want_bwd = _authors(scores, k, S, 0.05, noise)
    g = randn(b, k, d)
    y, gx = _run("reference", scores, k, S, 0.05, g, noise=noise)
    assert y.dtype == torch.float32 and y.shape == (b, k, d)
    assert torch.equal(y, want)
    torch.testing.assert_close(gx, want_bwd(g), rtol=1e-6, atol=1e-6)


def test_entries_are_counts_over_samples():
    scores, S, k = randn(3, 20), 37, 4
    y = ref_topk(scores, k, S, 0.3, seed=11)
    counts = (y * S).round()
    assert torch.equal(y, counts / S)
    # every sample contributes one entry per row j: rows sum to 1
    torch.testing.assert_close(y.sum(-1), torch.ones(3, k))
    # row j holds the j-th smallest index: the mean position increases with j
    pos = (y * torch.arange(20.0)).sum(-1)
    assert (pos[:, 1:] > pos[:, :-1]).all()


# ---------------------------------------------------- injected noise: fused == reference

def _check_injected(scores, noise, g, k, S, backends, distribution="normal", grad_tol=None):
    """Each backend's forward equals the reference's bit for bit on the same injected noise
    (no exact tie at the k-th place), and its backward is close. Returns the outputs."""
    _assert_no_boundary_ties(scores, noise, 0.05, k)
    want, gwant = _run("reference", scores, k, S, 0.05, g, noise=noise, distribution=distribution)
    out = {}
    for be in backends:
        y, gx = _run(be, scores, k, S, 0.05, g, noise=noise, distribution=distribution)
        assert torch.equal(y, want), be
        if grad_tol is None:
            torch.testing.assert_close(gx, gwant, rtol=1e-5, atol=1e-4, msg=be)
        else:
            torch.testing.assert_close(gx.double(), gwant.double(), **grad_tol, msg=be)
        out[be] = (y, gx)
    return out

@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_injected_noise_matches_reference(shape, distribution, device):
    b, d, k, S = shape
    scores, g = randn(b, d, device=device), randn(b, k, d, device=device)
    noise = _noise(shape, distribution, device)
    _check_injected(scores, noise, g, k, S, _backends_for(shape, device=device), distribution)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("scale", [20.0, 1e-3])
def test_injected_noise_wide_and_flat_scores(scale, device):
    """The C++ kernel skips elements whose score cannot reach the current k-th value (a
    bound from the noise maximum): spread-out scores exercise that path heavily, nearly flat
    scores not at all. Both must match the reference exactly."""
    shape = (6, 49, 3, 40)
    b, d, k, S = shape
    scores, g = randn(b, d, scale=scale, device=device), randn(b, k, d, device=device)
    _check_injected(scores, _noise(shape, "normal", device), g, k, S,
                    _backends_for(shape, device=device))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_injected_noise(shape, device):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")
    b, d, k, S = shape
    scores, g = randn(b, d, device=device), randn(b, k, d, device=device)
    _check_injected(scores, _noise(shape, "normal", device), g, k, S, ["triton"])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_injected_noise_other_dtypes(dtype, device):
    shape = (3, 49, 3, 12)
    b, d, k, S = shape
    backends = _backends_for(shape, device=device)
    if dtype == torch.bfloat16 and device == "cpu":
        backends = [be for be in backends if be != "triton"]  # broken in the interpreter
    scores, g = randn(b, d, dtype=dtype, device=device), randn(b, k, d, device=device)
    out = _check_injected(scores, _noise(shape, "normal", device), g, k, S, backends,
                          grad_tol=dict(rtol=2e-3, atol=1e-3))
    for be, (y, gx) in out.items():
        assert y.dtype == torch.float32 and gx.dtype == dtype, be


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_fused_outputs_fully_written(nan_poison, device):
    shape = (3, 13, 4, 6)
    b, d, k, S = shape
    scores, g = randn(b, d, device=device), randn(b, k, d, device=device)
    for be in _backends_for(shape, device=device):
        for kw in (dict(seed=3), dict(noise=torch.randn(b, S, d, device=device)), dict(hard=True)):
            y, gx = _run(be, scores, k, S, 0.1, g, **kw)
            assert not y.isnan().any() and not gx.isnan().any(), (be, kw)


# --------------------------------------------------- the backward is the SPEC's formula

@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
def test_backward_is_the_estimator_formula(distribution, device):
    """gradcheck does not apply to a stochastic, piecewise-constant forward; instead the
    backward of every backend must equal the SPEC's formula, written here in float64 with
    explicit loops, on fixed injected noise."""
    shape = (3, 9, 3, 8)
    b, d, k, S = shape
    sigma = 0.2
    scores, noise, g = randn(b, d), _noise(shape, distribution), randn(b, k, d)
    _assert_no_boundary_ties(scores, noise, sigma, k)
    gz = noise.double() if distribution == "normal" else 1 - torch.exp(-noise.double())
    want = torch.zeros(b, d, dtype=torch.float64)
    p = scores[:, None, :] + noise * sigma
    for r in range(b):
        for s in range(S):
            chosen = sorted(torch.topk(p[r, s], k).indices.tolist())
            for j, i in enumerate(chosen):
                want[r, i] += g[r, j, i].double() * gz[r, s, i] / (S * sigma)
    for be in _backends_for(shape, ALL, device):
        _, gx = _run(be, scores.to(device), k, S, sigma, g.to(device), noise=noise.to(device),
                     distribution=distribution)
        torch.testing.assert_close(gx.double().cpu(), want, rtol=1e-5, atol=1e-5, msg=be)


# ------------------------------------------------------- gradient="full": the whole Jacobian

def _full_by_jacobian(scores, noise, g, k, S, sigma, distribution):
    """The eager full-Jacobian reference: J = E[onehot(z) g(z)^T] / sigma as a [b, k, d, d]
    tensor (Berthet et al.'s "bnkd,bne->bkde"), contracted with the output gradient in
    float64."""
    _, one_hot = ref_topk_pieces(scores, k, S, sigma, noise, distribution)
    jac = ref_full_jacobian(one_hot.double(), noise.double(), S, sigma, distribution)
    return torch.einsum("bkd,bkde->be", g.double(), jac)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_full_gradient_matches_the_jacobian(shape, distribution, device):
    """Every backend's gradient="full" backward equals the eager full Jacobian contracted with
    the output gradient, on injected noise; the forward does not depend on the estimator."""
    b, d, k, S = shape
    sigma = 0.05
    scores, g = randn(b, d), randn(b, k, d)
    noise = _noise(shape, distribution)
    _assert_no_boundary_ties(scores, noise, sigma, k)
    want = _full_by_jacobian(scores, noise, g, k, S, sigma, distribution)
    y_diag, _ = _run("reference", scores, k, S, sigma, g, noise=noise, distribution=distribution)
    for be in _backends_for(shape, ALL, device):
        y, gx = _run(be, scores.to(device), k, S, sigma, g.to(device), noise=noise.to(device),
                     distribution=distribution, gradient="full")
        assert torch.equal(y.cpu(), y_diag), be
        torch.testing.assert_close(gx.double().cpu(), want, rtol=1e-5, atol=1e-4, msg=be)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_full_gradient_triton_shapes(shape, device):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")
    b, d, k, S = shape
    scores, g = randn(b, d), randn(b, k, d)
    noise = _noise(shape, "normal")
    want = _full_by_jacobian(scores, noise, g, k, S, 0.05, "normal")
    _, gx = _run("triton", scores.to(device), k, S, 0.05, g.to(device), noise=noise.to(device),
                 gradient="full")
    torch.testing.assert_close(gx.double().cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_full_gradient_other_dtypes(dtype, device):
    shape = (3, 49, 3, 12)
    b, d, k, S = shape
    backends = _backends_for(shape, ALL, device)
    if dtype == torch.bfloat16 and device == "cpu":
        backends = [be for be in backends if be != "triton"]  # broken in the interpreter
    scores, g = randn(b, d, dtype=dtype, device=device), randn(b, k, d, device=device)
    noise = _noise(shape, "normal", device)
    _assert_no_boundary_ties(scores.cpu(), noise.cpu(), 0.05, k)
    want = _full_by_jacobian(scores.cpu(), noise.cpu(), g.cpu(), k, S, 0.05, "normal")
    for be in backends:
        _, gx = _run(be, scores, k, S, 0.05, g, noise=noise, gradient="full")
        assert gx.dtype == dtype, be
        # the gradient is returned in the scores' dtype: bfloat16 keeps 8 significant bits
        rtol = 8e-3 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(gx.double().cpu(), want, rtol=rtol, atol=1e-3, msg=be)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
def test_full_gradient_seeded(distribution, seed, device):
    """Seeded: the backward redraws the forward's noise. Each backend equals the reference
    wherever its selections match the reference's (a near-tie of the noise transform's
    rounding can flip one sample, which moves that row's full gradient as a whole)."""
    for shape in [(16, 49, 3, 100), (2, 196, 5, 16), (3, 13, 13, 5), (2, 1, 1, 3)]:
        b, d, k, S = shape
        scores, g = randn(b, d, device=device), randn(b, k, d, device=device)
        want, gwant = _run("reference", scores, k, S, 0.05, g, seed=seed,
                           distribution=distribution, gradient="full")
        for be in _backends_for(shape, device=device):
            y, gx = _run(be, scores, k, S, 0.05, g, seed=seed, distribution=distribution,
                         gradient="full")
            same = (y == want).flatten(1).all(1)
            assert same.float().mean() >= 0.75, (be, shape)
            torch.testing.assert_close(gx[same], gwant[same], rtol=1e-4, atol=1e-3,
                                       msg=f"{be} {shape}")


def test_full_gradient_seeded_cpp_is_the_injected_computation():
    """The cpp kernel's seeded backward is its injected-noise backward on the very bits its
    generator draws (tvr_C.perturbed_topk_noise), to float rounding."""
    if not HAVE_EXT:
        pytest.skip("no extension")
    b, d, k, S = 5, 49, 3, 200
    scores, g = randn(b, d), randn(b, k, d)
    bits = torch.ops.tvr_C.perturbed_topk_noise(b, S, d, 77, False)
    ys, gs = _run("cpp", scores, k, S, 0.05, g, seed=77, gradient="full")
    yi, gi = _run("cpp", scores, k, S, 0.05, g, noise=bits, gradient="full")
    assert torch.equal(ys, yi)
    torch.testing.assert_close(gs, gi, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_full_gradient_is_shift_invariant_and_the_diagonal_is_not(backend):
    """Adding a constant to every score leaves the output unchanged, so the true derivative
    along the all-ones direction is 0. The full estimator's is a mean of zero-mean terms
    ``c[s] * sum_e z[s, e] / sigma`` (the noise's all-ones component is independent of the
    selection): it must lie within 5 standard errors of 0, computed from those terms on the
    very noise the kernels draw; the diagonal estimator's is far outside."""
    _skip_unless_runs(backend, "cpu")
    b, d, k, S, sigma, seed = 6, 10, 3, 40000, 0.1, 3
    # a positive output gradient keeps the diagonal sums from cancelling by chance
    scores, g = randn(b, d, scale=0.1), randn(b, k, d).abs()
    _, full = _run(backend, scores, k, S, sigma, g, seed=seed, gradient="full")
    _, diag = _run(backend, scores, k, S, sigma, g, seed=seed)
    noise = perturbed_topk_noise(b, S, d, seed, "normal")
    _, one_hot = ref_topk_pieces(scores, k, S, sigma, noise, "normal")
    terms = torch.einsum("bkd,bnkd->bn", g, one_hot) * noise.sum(-1) / sigma
    se = terms.std(1) / S ** 0.5
    assert (full.sum(1).abs() < 5 * se).all(), full.sum(1) / se
    assert (diag.sum(1).abs() > 20 * se).all(), diag.sum(1) / se


@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_full_gradient_cross_derivative(backend, distribution):
    """d = 2, k = 1: the chance of picking entry 0 is F(x0 - x1) for the noise difference's
    CDF F, so d P(0) / d x1 = -f(x0 - x1) / sigma-scaled. The diagonal estimator gives exactly
    0 for this cross derivative; the full one estimates it."""
    _skip_unless_runs(backend, "cpu")
    S = 200000 if backend == "cpp" else 20000
    sigma, delta = 0.1, 0.05
    scores = torch.tensor([[delta, 0.0]])
    g = torch.tensor([[[1.0, 0.0]]])  # grad of P(entry 0 chosen)
    _, full = _run(backend, scores, 1, S, sigma, g, seed=1, distribution=distribution,
                   gradient="full")
    _, diag = _run(backend, scores, 1, S, sigma, g, seed=1, distribution=distribution)
    t = torch.tensor(delta / sigma, dtype=torch.float64)
    if distribution == "normal":   # z1 - z0 ~ N(0, 2)
        dens = torch.exp(-t * t / 4) / (2 * torch.pi ** 0.5)
    else:                          # z1 - z0 ~ Logistic(0, 1)
        dens = torch.exp(-t) / (1 + torch.exp(-t)) ** 2
    true = -float(dens) / sigma    # d P(0) / d x1; d P(0) / d x0 = +dens / sigma
    assert diag[0, 1] == 0.0
    tol = 0.08 * abs(true) if backend == "cpp" else 0.25 * abs(true)
    assert abs(float(full[0, 1]) - true) < tol, (float(full[0, 1]), true)
    assert abs(float(full[0, 0]) + true) < tol, (float(full[0, 0]), -true)


# ---------------------------------------------------------------------- seeded noise

def test_seeded_noise_cpp_matches_reference_noise():
    if not HAVE_EXT:
        pytest.skip("no extension")
    for dist in ("normal", "gumbel"):
        for d in (49, 6, 1):
            bulk = torch.ops.tvr_C.perturbed_topk_noise(3, 17, d, 2 ** 40 + 9, dist == "gumbel")
            one = torch.ops.tvr_C.perturbed_topk_noise_scalar(3, 17, d, 2 ** 40 + 9, dist == "gumbel")
            want = perturbed_topk_noise(3, 17, d, 2 ** 40 + 9, dist)
            assert torch.equal(bulk, one), "vector and scalar generators give the same bits"
            torch.testing.assert_close(bulk, want, rtol=1e-5, atol=3e-6)


def test_seeded_noise_statistics():
    z = perturbed_topk_noise(4, 2000, 49, 123, "normal")
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # lanes of one Philox call are uncorrelated (Box-Muller cos/sin pairs included)
    lanes = z[..., :48].reshape(-1, 4).T
    assert (torch.corrcoef(lanes) - torch.eye(4)).abs().max() < 0.02
    gmb = perturbed_topk_noise(4, 2000, 49, 123, "gumbel")
    assert torch.isfinite(gmb).all()
    assert abs(gmb.mean() - 0.5772157) < 0.02 and abs(gmb.var() - torch.pi ** 2 / 6) < 0.05


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
def test_seeded_backends_agree(distribution, seed, device):
    """Seeded noise: every backend agrees with the reference up to the rounding of the noise
    transform (on a GPU also its approximate exp/sqrt), which can flip a selection only at a
    near-tie."""
    shapes = [(16, 49, 3, 100), (2, 196, 5, 16), (3, 13, 13, 5), (2, 1, 1, 3)]
    if device == "cuda":
        shapes.append((192, 49, 3, 500))  # the papers' shape
    for shape in shapes:
        b, d, k, S = shape
        scores, g = randn(b, d, device=device), randn(b, k, d, device=device)
        want, gwant = _run("reference", scores, k, S, 0.05, g, seed=seed, distribution=distribution)
        for be in _backends_for(shape, device=device):
            y, gx = _run(be, scores, k, S, 0.05, g, seed=seed, distribution=distribution)
            assert (y == want).float().mean() >= 0.999, (be, shape)
            assert (y - want).abs().max() <= 2.0 / S, (be, shape)
            torch.testing.assert_close(gx, gwant, rtol=1e-4, atol=1e-3, msg=f"{be} {shape}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_seeded_is_reproducible_and_seed_sensitive(backend, device):
    _skip_unless_runs(backend, device)
    shape = (3, 20, 3, 16)
    b, d, k, S = shape
    scores, g = randn(b, d, device=device), randn(b, k, d, device=device)
    y1, g1 = _run(backend, scores, k, S, 0.05, g, seed=5)
    y2, g2 = _run(backend, scores, k, S, 0.05, g, seed=5)
    y3, _ = _run(backend, scores, k, S, 0.05, g, seed=6)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert not torch.equal(y1, y3)
    # seed=None: a seed from torch's generator, so manual_seed reproduces it
    torch.manual_seed(1)
    y4, _ = _run(backend, scores, k, S, 0.05, g)
    torch.manual_seed(1)
    y5, _ = _run(backend, scores, k, S, 0.05, g)
    y6, _ = _run(backend, scores, k, S, 0.05, g)
    assert torch.equal(y4, y5) and not torch.equal(y5, y6)


# --------------------------------------------------------- the estimator is unbiased

@pytest.mark.parametrize("distribution", ["normal", "gumbel"])
def test_gradient_estimator_against_finite_differences(distribution):
    """d/d scores[i] of E[sum_j c_j indicators[j, i]] by central finite differences (common
    noise for +h and -h) against the estimator, per column i. The SPEC's (the authors')
    estimator keeps only these diagonal terms d E[ind[j, i]] / d scores[i], so that is what is
    compared. M independent chunks give a standard error; the signal must clear it."""
    backend = "cpp" if HAVE_EXT else "reference"
    d, k, S, M, sigma, h = 6, 2, 4000, 16, 0.5, 0.05
    gen = torch.Generator().manual_seed(1234)
    theta = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.25, -0.1])
    c = torch.randn(k, d, generator=gen)
    # rows per chunk: theta, then theta + h e_i and theta - h e_i for each i
    shifts = torch.cat([torch.zeros(1, d), h * torch.eye(d), -h * torch.eye(d)])
    rows = (theta + shifts).repeat(M, 1)  # [M * (1 + 2d), d]
    if distribution == "normal":
        base = torch.randn(M, S, d, generator=gen)
    else:
        u = torch.rand(M, S, d, generator=gen).clamp_(1e-7, 1 - 1e-7)
        base = -torch.log(-torch.log(u))
    noise = base.repeat_interleave(1 + 2 * d, dim=0)  # common noise within a chunk
    grad_out = torch.zeros(M * (1 + 2 * d), k, d)
    grad_out[:: 1 + 2 * d] = c
    y, gx = _run(backend, rows, k, S, sigma, grad_out, noise=noise, distribution=distribution)
    y = y.reshape(M, 1 + 2 * d, k, d)
    est = gx.reshape(M, 1 + 2 * d, d)[:, 0]                                 # [M, d]
    col = (y * c).sum(2)                                                     # [M, 1+2d, d]
    idx = torch.arange(d)
    fd = (col[:, 1 + idx, idx] - col[:, 1 + d + idx, idx]) / (2 * h)         # [M, d]
    diff = est - fd
    se = diff.std(0) / M ** 0.5
    assert (diff.mean(0).abs() <= 4 * se + 0.02 * fd.mean(0).abs() + 1e-3).all(), (est.mean(0), fd.mean(0))
    se_fd = fd.std(0) / M ** 0.5
    assert (fd.mean(0).abs() > 4 * se_fd).sum() >= d // 2, "the test must have signal"


# ------------------------------------------------------------------------- hard mode

@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_hard_mode(backend, device):
    _skip_unless_runs(backend, device)
    b, d, k = 3, 49, 3
    scores = randn(b, d, device=device)
    g = randn(b, k, d, device=device)
    y, gx = _run(backend, scores, k, 500, 0.05, g, hard=True)
    idx = torch.sort(torch.topk(scores, k).indices, dim=-1).values
    assert torch.equal(y, torch.nn.functional.one_hot(idx, d).float())
    assert torch.equal(gx, torch.zeros_like(scores)), "plain top-k is piecewise constant"
    # exact ties go to the smaller index, on every backend
    tied = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0]], device=device)
    y, _ = _run(backend, tied, 2, 1, 0.05, torch.ones(1, 2, 6, device=device), hard=True)
    want = torch.nn.functional.one_hot(torch.tensor([[1, 3]], device=device), 6).float()
    assert torch.equal(y, want)


def test_hard_mode_is_the_limit_of_small_sigma():
    scores = randn(4, 30)
    hard = tk.perturbed_topk(scores, 5, hard=True)
    soft = tk.perturbed_topk(scores, 5, 64, 1e-6, seed=0)
    assert torch.equal(hard, soft)


# ------------------------------------------------------------- registration, compile

@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck(device):
    b, d, k, S = 2, 13, 3, 5
    x = randn(b, d, requires_grad=True, device=device)
    noise = torch.randn(b, S, d, device=device)
    for backend in ["", "reference", *fused_backends(device, ("cpp", "triton"))]:
        for nz, seed, dist, hard in [(None, 7, "normal", False), (noise, 0, "gumbel", False),
                                     (None, 0, "normal", True)]:
            for gradient in ("diagonal", "full"):
                torch.library.opcheck(torch.ops.tvr.perturbed_topk.default,
                                      (x, k, S, 0.1, nz, seed, dist, hard, gradient, backend))
        w = torch.randn(b, k, d, device=device)
        torch.library.opcheck(torch.ops.tvr.perturbed_topk_backward.default,
                              (randn(b, k, d, device=device), w, S, 0.1, backend))
        for nz, dist in [(None, "normal"), (noise, "gumbel")]:
            torch.library.opcheck(torch.ops.tvr.perturbed_topk_full_backward.default,
                                  (randn(b, k, d, device=device), x.detach(), k, S, 0.1, nz, 5,
                                   dist, backend))


def test_compile_fullgraph():
    x = randn(6, 49, requires_grad=True)
    f = torch.compile(lambda t: tk.perturbed_topk(t, 3, 32, 0.05, seed=9) * 2.0, fullgraph=True)
    y = f(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    ye = tk.perturbed_topk(x, 3, 32, 0.05, seed=9) * 2.0
    (ge,) = torch.autograd.grad(ye, x, g)
    assert torch.equal(y, ye) and torch.equal(gx, ge)


def test_backward_outside_backend_block_uses_forward_backend():
    x = randn(2, 10, requires_grad=True)
    noise = torch.randn(2, 8, 10)
    with tk.use_backend("reference"):
        y = tk.perturbed_topk(x, 3, 8, 0.05, noise=noise)
    y.backward(torch.ones_like(y))
    (gr,) = torch.autograd.grad(ref_topk(x, 3, 8, 0.05, noise=noise), x, torch.ones_like(y))
    assert torch.equal(x.grad, gr)


# ------------------------------------------------------------------------ bad input

X = torch.randn(4, 10)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(scores=torch.randn(4, 10, 2), k=3), ValueError, r"scores must be 2-D \[b, d\]"),
    (dict(scores=[[1.0]], k=1), TypeError, "scores must be a torch.Tensor"),
    (dict(scores=torch.randint(0, 5, (4, 10)), k=3), TypeError, "scores must have dtype"),
    (dict(scores=X, k=0), ValueError, "k must be >= 1"),
    (dict(scores=X, k=11), ValueError, r"k must be <= d = scores.shape\[1\] = 10"),
    (dict(scores=X, k=2.0), TypeError, "k must be an int"),
    (dict(scores=X, k=3, num_samples=0), ValueError, "num_samples must be >= 1"),
    (dict(scores=X, k=3, sigma=0.0), ValueError, "sigma must be finite and > 0"),
    (dict(scores=X, k=3, sigma=-0.1), ValueError, "sigma must be finite and > 0"),
    (dict(scores=X, k=3, sigma=float("inf")), ValueError, "sigma must be finite and > 0"),
    (dict(scores=X, k=3, sigma=float("nan")), ValueError, "sigma must be finite and > 0"),
    (dict(scores=X, k=3, sigma="0.1"), TypeError, "sigma must be a number"),
    (dict(scores=X, k=3, num_samples=5, noise=torch.randn(4, 6, 10)), ValueError,
     r"noise must have shape \[b, num_samples, d\] = \[4, 5, 10\], got \(4, 6, 10\)"),
    (dict(scores=X, k=3, num_samples=5, noise=torch.randn(4, 10)), ValueError,
     r"noise must be 3-D \[b, num_samples, d\] = \[4, 5, 10\]"),
    (dict(scores=X, k=3, num_samples=5, noise=torch.randn(4, 5, 10, dtype=torch.float64)),
     TypeError, r"noise must have dtype in \(float32\)"),
    (dict(scores=X, k=3, num_samples=5, noise=torch.randn(4, 5, 10), seed=1), ValueError,
     "give noise or seed, not both"),
    (dict(scores=X, k=3, num_samples=5, noise=torch.randn(4, 5, 10), hard=True), ValueError,
     "noise must be None when hard=True"),
    (dict(scores=X, k=3, distribution="uniform"), ValueError, "distribution must be one of"),
    (dict(scores=X, k=3, seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (dict(scores=X, k=3, seed=1.5), TypeError, "seed must be an int or None"),
    (dict(scores=X, k=3, hard=1), TypeError, "hard must be a bool"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.perturbed_topk(**kwargs)
    with pytest.raises(err, match=match):
        ref_topk(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_bad_input_noise_device():
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        tk.perturbed_topk(X, 3, 5, noise=torch.randn(4, 5, 10, device="cuda"))
