"""Sinkhorn-Knopp biases of UCoFiA (SPEC 4).

``log_domain=False`` is the authors' probability-domain iteration, quirks included: with a
float32 logit range above ~88 (~104 with denormals) ``exp(logits - max)`` underflows to 0 for
whole columns, ``b`` becomes inf and the result is inf/NaN. ``log_domain=True`` runs the same
iteration on log-potentials with log-sum-exp updates; in exact arithmetic both compute the
same function, so they agree wherever the authors' version is finite.

One departure from the authors' code, invisible in the result: the row update is
``a = (Nv / Nq) / (K b)`` instead of ``a = 1 / (K b)``. The authors' updates ask in turn for
row sums 1 (mass Nq) and column sums 1 (mass Nv); unless Nq = Nv these marginals disagree and
every iteration scales ``a`` by about Nq / Nv and ``b`` by Nv / Nq: float32
overflows within ~88 / |ln(Nv / Nq)| iterations ([57, 1000] x 40 is inf/NaN; float64 fails
at [300, 200] x 2000), and the log domain loses |ln(Nv / Nq)| of precision headroom per
iteration. With rows summing to Nv / Nq the marginals agree and the scalings converge: ``b``
stays at the scale of the authors' first ``1 / K.sum(0)`` and ``a`` near 1. Scaling ``a`` by a
constant scales every later ``a`` by it and every ``b`` by its inverse, so ``log a`` and
``log b`` move by constants that the final ``log_softmax`` removes: the biases are the
authors' up to rounding wherever theirs are finite (bitwise when Nq = Nv).

Non-finite logits: these references propagate them (the result is NaN/inf; they validate
shapes only, so that they trace under ``torch.compile(fullgraph=True)``). The public op
``tvr_kernels.sinkhorn_knopp`` checks the data inside its kernels and raises ``ValueError``.
"""
from __future__ import annotations

import math

import torch

from .. import _validate


def check_sinkhorn_knopp_args(logits, n_iters, log_domain) -> None:
    _validate.tensor("logits", logits, ndim=2, shape_doc="[Nq, Nv]")
    _validate.integer("n_iters", n_iters, min_value=1)
    if not isinstance(log_domain, bool):
        raise TypeError(f"log_domain must be a bool, got {type(log_domain).__name__}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be non-empty [Nq, Nv], got shape {tuple(logits.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision logits are computed in float32 (exp of a half overflows at 11); the
    # result is cast back. float32 / float64 are computed in their own dtype, as the authors.
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_mass(Nq: int, Nv: int) -> tuple[float, float]:
    """``(Nv / Nq, ln(Nv / Nq))``: the row sums of the plan after each row update (see the
    module docstring), and their log (the log domain's ``kappa``), as float64 numbers. Every
    backend takes them from here (the C++ kernel from the same double expressions), so that the
    forward and the analytic backward agree on them."""
    return Nv / Nq, math.log(Nv / Nq)


def sinkhorn_knopp(logits: torch.Tensor, n_iters: int = 4, *,
                   log_domain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column biases from ``n_iters`` Sinkhorn-Knopp iterations over ``exp(logits)``.

    Args:
        logits: ``[Nq, Nv]`` float (UCoFiA: a bank of training texts x the test videos, the
            similarities times the logit scale 100).
        n_iters: number of ``(a, b)`` updates, >= 1.
        log_domain: False = the authors' probability-domain iteration, with row sums Nv / Nq
            (module docstring; inf/NaN for a float32 logit range above ~88); True =
            log-sum-exp updates, finite for any finite logits.

    Returns:
        ``(row_bias [Nq], col_bias [Nv])`` in ``logits.dtype``: ``log_softmax(log a)`` and
        ``log_softmax(log b - max(logits))``.
    """
    check_sinkhorn_knopp_args(logits, n_iters, log_domain)
    f_hist, g_hist = sinkhorn_potentials(logits, n_iters, log_domain)
    row = torch.log_softmax(f_hist[-1], dim=0)
    col = torch.log_softmax(g_hist[-1], dim=0)
    return row.to(logits.dtype), col.to(logits.dtype)


def sinkhorn_potentials(logits: torch.Tensor, n_iters: int,
                        log_domain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-potentials of every iteration (what the fused backward saves).

    Returns ``f_hist [n_iters, Nq]`` (``log a`` after each update) and ``g_hist
    [n_iters + 1, Nv]`` (``log b - max(logits)``: the initial ``b`` then each update), in the
    computation dtype (float64 for float64 logits, else float32). With ``kappa = ln(Nv / Nq)``
    (``row_mass``), the two plans of iteration ``t`` are, in both domains,
    ``exp(logits + f_hist[t-1][:, None] + g_hist[t-1][None, :])`` with row sums ``Nv / Nq``
    (``f`` is ``kappa - LSE_j(logits + g)``) and ``exp(logits + f_hist[t-1][:, None] +
    g_hist[t][None, :])`` with column sums 1 (``g`` is ``-LSE_i(logits + f)``).
    """
    x = logits.to(_compute_dtype(logits.dtype))
    ratio, kappa = row_mass(*x.shape)
    m = x.amax(dim=(0, 1))  # = x.max(); amax also traces under functorch in opcheck
    fs, gs = [], []
    if log_domain:
        z = x - m
        log_b = -torch.logsumexp(z, dim=0)
        gs.append(log_b - m)
        for _ in range(n_iters):
            log_a = kappa - torch.logsumexp(z + log_b[None, :], dim=1)
            log_b = -torch.logsumexp(z + log_a[:, None], dim=0)
            fs.append(log_a)
            gs.append(log_b - m)
    else:
        # The authors' iteration but for the row sums Nv / Nq (the module docstring); the logs
        # only record it (they do not feed back).
        K = torch.exp(x - m)
        b = 1.0 / K.sum(0)
        gs.append(torch.log(b) - m)
        for _ in range(n_iters):
            a = ratio / (K @ b)
            b = 1.0 / (a @ K)
            fs.append(torch.log(a))
            gs.append(torch.log(b) - m)
    return torch.stack(fs), torch.stack(gs)
