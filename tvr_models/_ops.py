"""The one place where the models reach the ``tvr_kernels`` ops.

The models run the library's ops (fused kernels, with ``tk.use_backend`` choosing the
implementation), never their own copies. ``op(name)`` looks the op up on ``tvr_kernels`` at
*call* time, so a test can monkeypatch ``tvr_kernels`` and see the models call the patched op.
"""
from __future__ import annotations

import functools

import torch

import tvr_kernels as tk


def op(name: str):
    """The public ``tvr_kernels`` op ``name`` (``token_shift``, ``perturbed_topk``, ``isa``,
    ``bi_isa``, ``sinkhorn_knopp``, ``stochastic_max_similarity`` or
    ``stochastic_text_embedding``), run by :func:`_autocast_promote`."""
    return _autocast_promote(getattr(tk, name))


def _autocast_promote(fn):
    """``fn`` as ``torch.autocast``'s "promote" ops run: inside an autocast region the ops
    would meet bf16 activations next to float32 parameters (UCoFiA's ISA weights) and refuse
    mixed dtypes, so their floating inputs are cast to the widest dtype among them and the
    op runs with autocast off. Outside autocast: ``fn`` unchanged."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        device = tensors[0].device.type if tensors else "cpu"
        if not tensors or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
        cast = lambda a: a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return run


def perturbed_topk(scores, k, num_samples=500, sigma=0.05, *, seed=None, hard=False,
                   gradient="diagonal", distribution="normal"):
    """``tk.perturbed_topk`` ([b, d] -> [b, k, d]); ``hard=True`` is the deterministic top-k,
    ``gradient`` its estimator (``"diagonal"``: the authors'; ``"full"``), ``distribution``
    the noise (``"normal"``: TS2-Net's; ``"gumbel"``: TokenBinder's)."""
    return op("perturbed_topk")(scores, k, num_samples, sigma, seed=seed, hard=hard,
                                gradient=gradient, distribution=distribution)
