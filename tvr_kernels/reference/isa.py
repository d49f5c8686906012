"""ISA and Bi-ISA of UCoFiA (SPEC 3), written as the authors compute them: Bi-ISA
materialises the full patch-word similarity ``G`` ``[Bt, L, Bv, P]``."""
from __future__ import annotations

import torch

from .. import _validate


def _same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n} is {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"all tensors must have one dtype, got {desc}")


def _square(name: str, w, n: int, axis_doc: str) -> None:
    _validate.tensor(name, w, ndim=2, shape_doc=f"[{n}, {n}] ({axis_doc})")
    if tuple(w.shape) != (n, n):
        raise ValueError(f"{name} must be [{n}, {n}] ({axis_doc}), got shape {tuple(w.shape)}")


def check_isa_args(sim, weight, dim, tau) -> None:
    _validate.tensor("sim", sim, shape_doc="[..., n, ...] (n = sim.shape[dim])")
    if sim.dim() == 0:
        raise ValueError("sim must have at least 1 dimension [..., n, ...], got a 0-D tensor")
    _validate.integer("dim", dim, min_value=-sim.dim(), max_value=sim.dim() - 1)
    n = sim.shape[dim]
    if n == 0:
        raise ValueError(f"sim.shape[dim] (the reduced axis) must be >= 1, got shape {tuple(sim.shape)}")
    _square("weight", weight, n, f"n = sim.shape[{dim}]")
    _validate.positive_finite("tau", tau)
    _same_dtype(sim=sim, weight=weight)
    _validate.same_device(sim=sim, weight=weight)


def check_bi_isa_args(words, patches, word_weight, patch_weight, word_weight2, patch_weight2,
                      tau) -> None:
    _validate.tensor("words", words, ndim=3, shape_doc="[Bt, L, D]")
    _validate.tensor("patches", patches, ndim=3, shape_doc="[Bv, P, D]")
    if words.shape[2] != patches.shape[2]:
        raise ValueError(f"words [Bt, L, D] = {tuple(words.shape)} and patches [Bv, P, D] = "
                         f"{tuple(patches.shape)} must have the same D (last dimension)")
    L, P = words.shape[1], patches.shape[1]
    if L == 0 or P == 0:
        raise ValueError(f"L (words.shape[1]) and P (patches.shape[1]) must be >= 1, got L = {L}, P = {P}")
    _square("word_weight", word_weight, L, "L = words.shape[1]")
    _square("patch_weight", patch_weight, P, "P = patches.shape[1]")
    _square("word_weight2", word_weight2, L, "L = words.shape[1]")
    _square("patch_weight2", patch_weight2, P, "P = patches.shape[1]")
    _validate.positive_finite("tau", tau)
    tensors = dict(words=words, patches=patches, word_weight=word_weight,
                   patch_weight=patch_weight, word_weight2=word_weight2,
                   patch_weight2=patch_weight2)
    _same_dtype(**tensors)
    _validate.same_device(**tensors)


def _isa(sim: torch.Tensor, weight: torch.Tensor, dim: int, tau: float) -> torch.Tensor:
    a = torch.softmax(sim / tau, dim=dim)
    # B_j = sum_i A_i weight[i, j] along `dim`: move it last for the matrix product.
    b = torch.matmul(a.movedim(dim, -1), weight).movedim(-1, dim)
    w = torch.softmax(b / tau, dim=dim)
    return (w * sim).sum(dim)


def isa(sim: torch.Tensor, weight: torch.Tensor, dim: int = -1, tau: float = 0.01) -> torch.Tensor:
    """Interactive similarity aggregation over axis ``dim``.

    Args:
        sim: ``[..., n, ...]`` similarities, any rank; ``n = sim.shape[dim]``.
        weight: ``[n, n]``.
        dim: the reduced axis.
        tau: softmax temperature (> 0).

    Returns:
        ``sim.shape`` without ``dim``: ``sum_j w_j sim_j`` with ``A = softmax(sim / tau)``,
        ``B_j = sum_i A_i weight[i, j]``, ``w = softmax(B / tau)`` along ``dim``.
    """
    check_isa_args(sim, weight, dim, tau)
    return _isa(sim, weight, dim, tau)


def bi_isa(words: torch.Tensor, patches: torch.Tensor, word_weight: torch.Tensor,
           patch_weight: torch.Tensor, word_weight2: torch.Tensor, patch_weight2: torch.Tensor,
           tau: float = 0.01) -> torch.Tensor:
    """Bi-directional ISA over the patch-word similarity (UCoFiA), materialising ``G``.

    Args:
        words: ``[Bt, L, D]``; patches: ``[Bv, P, D]``.
        word_weight, word_weight2: ``[L, L]``; patch_weight, patch_weight2: ``[P, P]``.
        tau: softmax temperature (> 0).

    Returns:
        ``[Bt, Bv]``: the mean of path A (ISA over words with ``word_weight`` -> ``[Bt, Bv, P]``,
        then over patches with ``patch_weight2``) and path B (ISA over patches with
        ``patch_weight`` -> ``[Bt, L, Bv]``, then over words with ``word_weight2``).
    """
    check_bi_isa_args(words, patches, word_weight, patch_weight, word_weight2, patch_weight2, tau)
    G = torch.einsum("tld,vpd->tlvp", words, patches)          # [Bt, L, Bv, P]
    path_a = _isa(_isa(G, word_weight, 1, tau), patch_weight2, 2, tau)   # [Bt, Bv, P] -> [Bt, Bv]
    path_b = _isa(_isa(G, patch_weight, 3, tau), word_weight2, 1, tau)   # [Bt, L, Bv] -> [Bt, Bv]
    return (path_a + path_b) / 2
