"""sinkhorn_knopp at the UCoFiA evaluation shape: a bank of 45000 training texts against
1000 test videos, 4 iterations, CLIP-like logits (similarities x logit scale 100). UCoFiA
detaches (fwd); fwd+bwd is for users who train through it. Both domains.

Traffic (GB/s, ``copy``): the logits read once and the two bias vectors written in forward;
backward reads the logits again and writes their gradient. The iterations re-read the
matrix (it does not fit in cache), so the fraction of a copy shows how close the passes
come to one."""
import torch

from benchmarks.common import Case


def _inputs(nq, nv, log_domain):
    def make(device):
        sims = 0.25 + 0.1 * torch.randn(nq, nv, device=device)
        return dict(logits=100.0 * sims, n_iters=4, log_domain=log_domain)
    return make


def _traffic(inputs, mode):
    logits = inputs["logits"]
    matrix = logits.numel() * logits.element_size()
    vectors = sum(logits.shape) * logits.element_size()
    fwd, bwd = matrix + vectors, 2 * matrix + vectors
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


CASES = [
    Case(op="sinkhorn_knopp", name=f"[{nq},{nv}] f32 it=4 {dom}", make_inputs=_inputs(nq, nv, dom == "log"),
         grad_args=("logits",), modes=("fwd", "fwd+bwd"), traffic=_traffic, shapes=shapes)
    for nq, nv, shapes in ((45000, 1000, ("paper",)), (50, 20, ("small",)))
    for dom in ("prob", "log")
]
