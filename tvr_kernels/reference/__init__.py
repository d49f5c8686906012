"""Pure-PyTorch references mirroring the authors' code (SPEC.md). Every fused op in
:mod:`tvr_kernels` has the same signature as its reference here and is tested against it."""
from .isa import bi_isa, isa
from .perturbed_topk import perturbed_topk
from .sinkhorn_knopp import sinkhorn_knopp
from .stochastic_max_similarity import stochastic_max_similarity, stochastic_text_embedding
from .token_shift import token_shift

__all__ = ["bi_isa", "isa", "perturbed_topk", "sinkhorn_knopp", "stochastic_max_similarity",
           "stochastic_text_embedding", "token_shift"]
