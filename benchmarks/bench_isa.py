"""ISA and Bi-ISA (UCoFiA) at the papers' shapes: the sentence-frame ISA over a 1000 x 1000
evaluation ([Nt, Nv, T = 12]), the patch-word Bi-ISA on a training tile (Bt = Bv = 64, L = 32
words, P = 48 patches, D = 512) and on a 1000 x 1000 evaluation.

At 1000 x 1000 the authors' code would materialise G = [1000, 32, 1000, 48] (6.1 GB in float32,
several times that with the softmax intermediates); the reference provider there is a driver
that runs the reference on 25 texts at a time (G chunks of 153 MB), so it finishes on this
machine. The fused kernels take the whole evaluation in one call.
"""
import math

import torch

from benchmarks.common import Case

EVAL_TEXT_CHUNK = 25


def _clip_like(*shape, D, device):
    """Features whose dot products look like CLIP cosines (a shared direction plus noise), so
    the tau = 0.01 softmaxes are in their realistic regime."""
    common = torch.randn(D, device=device)
    common = common / common.norm()
    noise = torch.randn(*shape, D, device=device) * (0.03 / math.sqrt(D)) ** 0.5
    return 0.5 * common + noise


def _weight(n, device):
    return torch.eye(n, device=device) + 0.02 * torch.randn(n, n, device=device)


def _isa_inputs(nt, nv, t):
    def make(device):
        return dict(sim=0.25 + 0.03 * torch.randn(nt, nv, t, device=device),
                    weight=_weight(t, device), dim=-1, tau=0.01)
    return make


def _bi_inputs(Bt, Bv, L=32, P=48, D=512):
    def make(device):
        return dict(words=_clip_like(Bt, L, D=D, device=device),
                    patches=_clip_like(Bv, P, D=D, device=device),
                    word_weight=_weight(L, device), patch_weight=_weight(P, device),
                    word_weight2=_weight(L, device), patch_weight2=_weight(P, device), tau=0.01)
    return make


def _reference_by_text_chunks(words, patches, word_weight, patch_weight, word_weight2,
                              patch_weight2, tau=0.01):
    """The reference on EVAL_TEXT_CHUNK texts at a time (the caller-side chunking an
    evaluation loop would do), concatenated."""
    from tvr_kernels.reference import bi_isa
    return torch.cat([bi_isa(words[i:i + EVAL_TEXT_CHUNK], patches, word_weight, patch_weight,
                             word_weight2, patch_weight2, tau)
                      for i in range(0, words.shape[0], EVAL_TEXT_CHUNK)])


_BI_GRADS = ("words", "patches", "word_weight", "patch_weight", "word_weight2", "patch_weight2")

CASES = [
    Case(op="isa", name="frames [1000,1000,12] f32 dim=-1", make_inputs=_isa_inputs(1000, 1000, 12),
         grad_args=("sim", "weight"), modes=("fwd", "fwd+bwd"), denormals=True),
    Case(op="bi_isa", name="train Bt=Bv=64 L=32 P=48 D=512", make_inputs=_bi_inputs(64, 64),
         grad_args=_BI_GRADS, modes=("fwd", "fwd+bwd"), denormals=True),
    Case(op="bi_isa", name="eval 1000x1000 L=32 P=48 D=512", make_inputs=_bi_inputs(1000, 1000),
         modes=("fwd",), reference=_reference_by_text_chunks, compile_reference=False,
         note=f"reference chunked by {EVAL_TEXT_CHUNK} texts (unchunked G: 6.1 GB)",
         warmup=0, min_reps=1, denormals=True,
         heavy=("reference", "reference_ftz")),  # about a minute per call each
    Case(op="isa", name="frames [30,20,12] f32 dim=-1", make_inputs=_isa_inputs(30, 20, 12),
         grad_args=("sim", "weight"), modes=("fwd", "fwd+bwd"), shapes=("small",)),
    Case(op="bi_isa", name="Bt=6 Bv=5 L=8 P=12 D=64", make_inputs=_bi_inputs(6, 5, L=8, P=12, D=64),
         grad_args=_BI_GRADS, modes=("fwd", "fwd+bwd"), shapes=("small",)),
]
