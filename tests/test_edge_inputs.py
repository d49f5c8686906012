"""Edge inputs that once crashed the process (issue 11): size-0 batches."""
import pytest
import torch

import tvr_kernels as tk
from tvr_kernels import _backend


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
