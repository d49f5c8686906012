"""sinkhorn_knopp at the UCoFiA evaluation shape: a bank of 45000 training texts against
1000 test videos, 4 iterations, CLIP-like logits (similarities x logit scale 100). UCoFiA
detaches (fwd); fwd+bwd is for users who train through it. Both domains."""
import torch

from benchmarks.common import Case

NQ, NV = 45000, 1000


def _inputs(log_domain):
    def make(device):
        sims = 0.25 + 0.1 * torch.randn(NQ, NV, device=device)
        return dict(logits=100.0 * sims, n_iters=4, log_domain=log_domain)
    return make


CASES = [
    Case(op="sinkhorn_knopp", name=f"[{NQ},{NV}] f32 it=4 {dom}", make_inputs=_inputs(dom == "log"),
         grad_args=("logits",), modes=("fwd", "fwd+bwd"))
    for dom in ("prob", "log")
]
