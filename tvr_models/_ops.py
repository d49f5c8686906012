"""The one place where the models reach the ``tvr_kernels`` ops.

The models run the library's ops (fused kernels, with ``tk.use_backend`` choosing the
implementation), never their own copies. ``op(name)`` looks the op up on ``tvr_kernels`` at
*call* time, so a test can monkeypatch ``tvr_kernels`` and see the models call the patched op.
"""
from __future__ import annotations

import tvr_kernels as tk


def op(name: str):
    """The public ``tvr_kernels`` op ``name`` (``token_shift``, ``perturbed_topk``, ``isa``,
    ``bi_isa``, ``sinkhorn_knopp``, ``stochastic_max_similarity`` or
    ``stochastic_text_embedding``)."""
    return getattr(tk, name)


def perturbed_topk(scores, k, num_samples=500, sigma=0.05, *, seed=None, hard=False,
                   gradient="diagonal", distribution="normal"):
    """``tk.perturbed_topk`` ([b, d] -> [b, k, d]); ``hard=True`` is the deterministic top-k,
    ``gradient`` its estimator (``"diagonal"``: the authors'; ``"full"``), ``distribution``
    the noise (``"normal"``: TS2-Net's; ``"gumbel"``: TokenBinder's)."""
    return op("perturbed_topk")(scores, k, num_samples, sigma, seed=seed, hard=hard,
                                gradient=gradient, distribution=distribution)
