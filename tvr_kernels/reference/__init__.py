"""Pure-PyTorch references mirroring the authors' code (SPEC.md). Every fused op in
:mod:`tvr_kernels` has the same signature as its reference here and is tested against it."""
from .isa import bi_isa, isa
from .token_shift import token_shift

__all__ = ["bi_isa", "isa", "token_shift"]
