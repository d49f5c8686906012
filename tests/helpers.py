"""Assertions and input makers shared by the op tests."""
import torch

# Tolerances of a fused kernel against the float32-computing reference, per dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}


def close(a: torch.Tensor, b: torch.Tensor, dtype=None, **override):
    tol = dict(TOL[dtype or a.dtype])
    tol.update(override)
    torch.testing.assert_close(a, b, **tol)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    """Fresh random input; never zeros or constants."""
    x = torch.randn(*shape, device=device, dtype=torch.float32) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def authors_sinkhorn(logits: torch.Tensor, n_iters: int):
    """UCoFiA's probability-domain Sinkhorn iteration as in SPEC 4, unrescaled (the authors'
    row sums 1): ``(row_bias, col_bias)``."""
    m = logits.max()
    K = torch.exp(logits - m)
    b = 1 / K.sum(0)
    for _ in range(n_iters):
        a = 1 / (K @ b)
        b = 1 / (a @ K)
    return torch.log_softmax(torch.log(a), 0), torch.log_softmax(torch.log(b) - m, 0)
