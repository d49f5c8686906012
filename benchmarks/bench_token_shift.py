"""token_shift at the TS2-Net shape: a ViT-B/32 layer over 16 videos x 12 frames.

Memory-bound: forward reads x and writes the shifted copy, backward reads the output gradient
and writes the input gradient, so each mode's traffic is that of one clone per pass (the
``copy`` baseline moves the same bytes)."""
import torch

from benchmarks.common import Case


def _inputs(b, n, c, t):
    def make(device):
        return dict(x=torch.randn(b, n, c, device=device), num_frames=t)
    return make


def _traffic(inputs, mode):
    one_pass = 2 * inputs["x"].numel() * inputs["x"].element_size()
    return one_pass * (2 if mode == "fwd+bwd" else 1)


def _case(shape, t, shapes):
    return Case(op="token_shift", name=f"[{','.join(map(str, shape))}] f32 T={t}",
                make_inputs=_inputs(*shape, t), grad_args=("x",), modes=("fwd", "bwd", "fwd+bwd"),
                traffic=_traffic, shapes=shapes)


CASES = [_case((192, 50, 768), 12, ("paper",)), _case((6, 10, 32), 3, ("small",))]
