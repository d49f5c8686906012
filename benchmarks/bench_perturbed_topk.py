"""perturbed_topk at the TS2-Net shape: 16 videos x 12 frames choose k = 3 of 49 patch tokens
with S = 500 samples, sigma = 0.05.

The reference provider is the authors' computation, drawing its own noise with
``torch.normal(0, 1, (b, S, d))`` as they do (the reference with ``noise=``); the fused
providers draw theirs in-kernel from a seed (Philox), which is how the op is used.
"""
import torch

import tvr_kernels as tk
from tvr_kernels.reference import perturbed_topk as ref_topk

from benchmarks.common import Case


def _inputs(b, d, k, num_samples):
    def make(device):
        return dict(scores=torch.randn(b, d, device=device), k=k, num_samples=num_samples, sigma=0.05)
    return make


def _authors(scores, k, num_samples, sigma):
    noise = torch.normal(0.0, 1.0, (scores.shape[0], num_samples, scores.shape[1]),
                         device=scores.device)
    return ref_topk(scores, k, num_samples, sigma, noise=noise)


def _fused(scores, k, num_samples, sigma):
    return tk.perturbed_topk(scores, k, num_samples, sigma, seed=0)


def _reference_full(scores, k, num_samples, sigma):
    noise = torch.normal(0.0, 1.0, (scores.shape[0], num_samples, scores.shape[1]),
                         device=scores.device)
    return ref_topk(scores, k, num_samples, sigma, noise=noise, gradient="full")


def _fused_full(scores, k, num_samples, sigma):
    return tk.perturbed_topk(scores, k, num_samples, sigma, seed=0, gradient="full")


CASES = [
    Case(op="perturbed_topk", name="[192,49] k=3 S=500 sigma=0.05", make_inputs=_inputs(192, 49, 3, 500),
         grad_args=("scores",), modes=("fwd", "fwd+bwd"), reference=_authors, fused=_fused,
         note="reference draws torch.normal noise (the authors'); fused backends use seed=0"),
    # The full estimator's backward walks the samples again (noise redrawn, selections redone).
    Case(op="perturbed_topk", name="[192,49] k=3 S=500 sigma=0.05 gradient=full",
         make_inputs=_inputs(192, 49, 3, 500), grad_args=("scores",), modes=("fwd+bwd",),
         reference=_reference_full, fused=_fused_full,
         note="full estimator; reference: its eager formula on torch.normal noise"),
    Case(op="perturbed_topk", name="[6,20] k=3 S=50 sigma=0.05", make_inputs=_inputs(6, 20, 3, 50),
         grad_args=("scores",), modes=("fwd", "fwd+bwd"), reference=_authors, fused=_fused,
         shapes=("small",)),
]
