"""Pure-PyTorch references mirroring the authors' code (SPEC.md). Every fused op in
:mod:`tvr_kernels` has the same signature as its reference here and is tested against it."""
from .sinkhorn_knopp import sinkhorn_knopp
from .token_shift import token_shift

__all__ = ["sinkhorn_knopp", "token_shift"]
