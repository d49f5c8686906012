"""The one place where the models reach the ``tvr_kernels`` ops.

The models must run the library's ops (fused kernels, with ``tk.use_backend`` choosing the
implementation), never their own copies. ``op(name)`` resolves at *call* time, in this order:

1. ``tvr_kernels.<name>``: the public op (the normal case once the op is merged);
2. ``tvr_kernels.reference.<name>``: its pure-PyTorch reference, if only that has landed;
3. a local stand-in below, written from SPEC's semantics, used only while the op is absent
   from the library altogether. ``missing_ops()`` names the ops that fall through to it.

Resolving per call (not at import) means a test can monkeypatch ``tvr_kernels`` and see the
models call the patched op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import tvr_kernels as tk
import tvr_kernels.reference as _ref

_NAMES = ("token_shift", "perturbed_topk", "isa", "bi_isa", "sinkhorn_knopp")


def op(name: str):
    """The callable behind op ``name`` (see the module docstring for the lookup order)."""
    f = getattr(tk, name, None) or getattr(_ref, name, None)
    if f is not None:
        return f
    return _STANDINS[name]


def missing_ops() -> list[str]:
    """Ops that are in neither ``tvr_kernels`` nor ``tvr_kernels.reference`` (stand-ins run)."""
    return [n for n in _NAMES if getattr(tk, n, None) is None and getattr(_ref, n, None) is None]


def perturbed_topk(scores, k, num_samples=500, sigma=0.05, *, seed=None, hard=False):
    """``tk.perturbed_topk`` ([b, d] -> [b, k, d]); ``hard=True`` is the deterministic top-k."""
    f = op("perturbed_topk")
    if hard:
        return f(scores, k, num_samples, sigma, seed=seed, hard=True)
    return f(scores, k, num_samples, sigma, seed=seed)


# --------------------------------------------------------------------------------------------
# STAND-INS (SPEC semantics, plain autograd). Only used while an op is missing from
# tvr_kernels entirely; they are not the library's kernels and carry no performance claims.
# --------------------------------------------------------------------------------------------
def _standin_perturbed_topk(scores, k, num_samples=500, sigma=0.05, *, noise=None, seed=None,
                            distribution="normal", hard=False):
    b, d = scores.shape
    if hard:
        idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        return F.one_hot(idx, d).float()
    if noise is None:
        gen = torch.Generator(device=scores.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))
        noise = torch.randn(b, num_samples, d, generator=gen, device=scores.device)
    return _PerturbedTopK.apply(scores, k, sigma, noise.float())


class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, sigma, noise):
        p = scores.float().unsqueeze(1) + sigma * noise
        idx = p.topk(k, dim=-1).indices.sort(dim=-1).values
        onehot = F.one_hot(idx, scores.shape[-1]).float()      # [b, S, k, d]
        ctx.save_for_backward(onehot, noise)
        ctx.sigma = sigma
        return onehot.mean(1)

    @staticmethod
    def backward(ctx, g):
        onehot, noise = ctx.saved_tensors
        s = noise.shape[1]
        expected = torch.einsum("bskd,bsd->bkd", onehot, noise) / (s * ctx.sigma)
        return torch.einsum("bkd,bkd->bd", g, expected), None, None, None


def _standin_isa(sim, weight, dim=-1, tau=0.01):
    sim_t = sim.movedim(dim, -1)
    w = torch.softmax(torch.softmax(sim_t / tau, -1) @ weight / tau, -1)
    return (w * sim_t).sum(-1)


def _standin_bi_isa(words, patches, word_weight, patch_weight, word_weight2, patch_weight2,
                    tau=0.01):
    g = torch.einsum("tld,vpd->tlvp", words, patches)
    a = _standin_isa(_standin_isa(g, word_weight, dim=1, tau=tau), patch_weight2, -1, tau)
    b = _standin_isa(_standin_isa(g, patch_weight, dim=-1, tau=tau), word_weight2, 1, tau)
    return (a + b) / 2


def _standin_sinkhorn_knopp(logits, n_iters=4, *, log_domain=False):
    m = logits.max()
    k = torch.exp(logits - m)
    b = 1 / k.sum(0)
    for _ in range(n_iters):
        a = 1 / (k @ b)
        b = 1 / (a @ k)
    return torch.log_softmax(a.log(), 0), torch.log_softmax(b.log() - m, 0)


_STANDINS = {
    "perturbed_topk": _standin_perturbed_topk,
    "isa": _standin_isa,
    "bi_isa": _standin_bi_isa,
    "sinkhorn_knopp": _standin_sinkhorn_knopp,
}
