"""tvr-kernels: fused kernels for CLIP-based text-video retrieval.

Every op is a ``torch.library`` custom op (``torch.ops.tvr.*``) with autograd, a fake kernel
for ``torch.compile``, a pure-PyTorch reference (:mod:`tvr_kernels.reference`), a fused C++ CPU
kernel and a Triton kernel. ``use_backend`` forces one implementation.
"""
from ._backend import available_backends, use_backend, warn_if_pure_python
from .ops.isa import bi_isa, isa
from .ops.perturbed_topk import perturbed_topk
from .ops.sinkhorn_knopp import sinkhorn_knopp
from .ops.stochastic_max_similarity import stochastic_max_similarity, stochastic_text_embedding
from .ops.token_shift import token_shift

__all__ = ["available_backends", "use_backend", "bi_isa", "isa", "perturbed_topk",
           "sinkhorn_knopp", "stochastic_max_similarity", "stochastic_text_embedding",
           "token_shift"]
__version__ = "0.1.0"

warn_if_pure_python()
