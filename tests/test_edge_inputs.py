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
