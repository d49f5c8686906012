"""token_shift at the TS2-Net shape: a ViT-B/32 layer over 16 videos x 12 frames."""
import torch

from benchmarks.common import Case


class _CopyBoth(torch.autograd.Function):
    """The bandwidth floor: one read and one write in forward (x.clone()) and in backward
    (grad.clone()), the same traffic as token shift."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clone()


def _inputs(device):
    return dict(x=torch.randn(192, 50, 768, device=device), num_frames=12)


CASES = [
    Case(op="token_shift", name="[192,50,768] f32 T=12", make_inputs=_inputs, grad_args=("x",),
         modes=("fwd", "bwd", "fwd+bwd"),
         baselines={"copy": lambda inp: (lambda x, num_frames: _CopyBoth.apply(x))}),
]
