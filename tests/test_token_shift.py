"""token_shift (SPEC 1): every backend bit-exact against the reference, forward and backward."""
import pytest
import torch

import tvr_kernels as tk
from tvr_kernels.reference import token_shift as ref_token_shift

from conftest import DEVICES, fused_backends
from helpers import randn

# (B, T, N, C, fold_div, offset): odd sizes, size 1, overlapping sets (fold <= offset),
# T = 1 and 2, the papers' N = 50 (B/32) and N = 197 (B/16).
SHAPES = [
    (2, 12, 50, 8, 7, 3),
    (1, 12, 197, 4, 7, 3),
    (3, 5, 13, 3, 7, 3),
    (2, 3, 10, 5, 7, 3),    # fold = 1: every token in both sets, the forward one wins
    (1, 4, 9, 1, 3, 1),     # fold = 3, offset = 1
    (2, 1, 50, 6, 7, 3),    # one frame: nothing moves
    (1, 2, 17, 7, 2, 0),    # offset 0: the two sets coincide
    (1, 3, 7, 2, 7, 3),     # N = fold_div: fold = 1
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _check(backend, device, shape, dtype, four_d=False, noncontig=False):
    B, T, N, C, fd, off = shape
    if noncontig:  # a strided view: channels-first storage, transposed back
        x = randn(B * T, C, N, dtype=dtype, device=device).transpose(1, 2)
        assert not x.is_contiguous()
    else:
        x = randn(B * T, N, C, dtype=dtype, device=device)
    if four_d:
        x = x.reshape(B, T, N, C)
    x.requires_grad_(True)
    with tk.use_backend(backend):
        y = tk.token_shift(x, T, fd, off)
        g = randn(*y.shape, dtype=dtype, device=device)
        (gx,) = torch.autograd.grad(y, x, g)
    yr = ref_token_shift(x, T, fd, off)
    (gr,) = torch.autograd.grad(yr, x, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, yr), "forward is a pure copy and must be bit-exact"
    assert torch.equal(gx, gr), "backward sums at most two values and must be bit-exact"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_and_cuda_match_reference(device, shape, dtype):
    for backend in fused_backends(device, ("cpp", "cuda")):
        _check(backend, device, shape, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[2:6], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_matches_reference(device, shape, dtype):
    if "triton" not in fused_backends(device, ("triton",)):
        pytest.skip("triton unavailable")
    _check("triton", device, shape, dtype)


@pytest.mark.parametrize("dtype,int64_rows", [(torch.float32, False), (torch.float16, False),
                                              (torch.float64, True)], ids=str)
def test_triton_gpu_blocks(monkeypatch, dtype, int64_rows):
    """The GPU tile choice run in the interpreter: [2*3, 10, 300] is 60 token rows in blocks of
    16 (float16: 32, float64: 8) and 300 channels in blocks of 256, both with a partial last
    block; int64_rows takes the row arithmetic's int64 path."""
    if "triton" not in fused_backends("cpu", ("triton",)):
        pytest.skip("triton interpreter unavailable")
    from tvr_kernels.triton import token_shift as tts

    br, bc, _ = tts._gpu_blocks(60, 300, dtype.itemsize)
    assert bc == 256 and br * bc * dtype.itemsize == 16384
    monkeypatch.setattr(tts, "_blocks", tts._gpu_blocks)
    if int64_rows:
        monkeypatch.setattr(tts, "_INT32_ROWS", 0)
    _check("triton", "cpu", (2, 3, 10, 300, 7, 3), dtype)


@pytest.mark.parametrize("rows,C,itemsize", [(9600, 768, 4), (9456, 768, 2), (9600, 768, 8), (15, 3, 4),
                                             (1, 1, 2), (2**20, 1, 4)], ids=str)
def test_triton_gpu_blocks_bounds(rows, C, itemsize):
    """GPU tiles of at most 16 KiB with power-of-two sides, no wider than the input needs."""
    pytest.importorskip("triton")
    from tvr_kernels.triton import token_shift as tts

    br, bc, nw = tts._gpu_blocks(rows, C, itemsize)
    assert br * bc * itemsize <= 16384 and nw == 4
    assert br & (br - 1) == 0 and bc & (bc - 1) == 0 and br < 2 * rows and bc < 2 * C


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton bf16 is broken in the interpreter")
def test_triton_bf16_gpu():
    _check("triton", "cuda", SHAPES[0], torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("four_d,noncontig", [(True, False), (False, True), (True, True)])
def test_layouts(device, four_d, noncontig):
    for backend in fused_backends(device):
        _check(backend, device, (2, 4, 15, 6, 7, 3), torch.float32, four_d=four_d, noncontig=noncontig)


def test_semantics_b32_sets():
    """The SPEC's B/32 sets: Ib = {1, 8, ..., 43} read t-1, If = {4, 11, ..., 46} read t+1."""
    T, N = 4, 50
    # Token values that encode (frame, token) so the output names its source.
    x = (torch.arange(T)[:, None] * 1000 + torch.arange(N)[None, :]).float()[:, :, None]
    y = tk.token_shift(x, T)[:, :, 0]
    src_frame = (y // 1000).long()
    assert torch.equal(y % 1000, torch.arange(N).float().expand(T, N)), "whole tokens move, never across n"
    Ib, If = set(range(1, N, 7)), set(range(4, N, 7))
    assert Ib == {1, 8, 15, 22, 29, 36, 43} and If == {4, 11, 18, 25, 32, 39, 46}
    for t in range(T):
        for n in range(N):
            want = t + 1 if (n in If and t < T - 1) else t - 1 if (n in Ib and t >= 1) else t
            assert src_frame[t, n] == want, (t, n)


def test_at_most_two_readers():
    """Each input row's gradient sums at most two output rows (the kernels rely on it)."""
    for fd, off, N in [(7, 3, 50), (7, 3, 10), (2, 0, 17), (3, 5, 12), (1, 0, 5)]:
        for T in (1, 2, 3, 7):
            x = torch.randn(T, N, 1, requires_grad=True)
            y = ref_token_shift(x, T, fd, off)
            (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
            assert g.max() <= 2


def test_gradcheck_reference():
    x = torch.randn(2 * 3, 11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref_token_shift(t, 3, 7, 3), (x,))
    x = torch.randn(2, 4, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref_token_shift(t, 4, 3, 1), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, four_d", [((2, 3, 9, 2, 7, 3), False),
                                           ((1, 4, 9, 2, 3, 1), True),    # overlapping sets
                                           ((1, 3, 8, 2, 2, 0), False)],  # offset 0
                         ids=str)
def test_gradgradcheck(device, shape, four_d):
    """The backward is a shift too (the transposed gather), differentiable again on every
    backend: float64 gradgradcheck."""
    B, T, N, C, fd, off = shape
    for backend in ["reference", *fused_backends(device)]:
        x = randn(B * T, N, C, dtype=torch.float64, device=device)
        x = (x.reshape(B, T, N, C) if four_d else x).requires_grad_(True)
        # interpreted triton: one random direction (fast mode) rather than every element
        # (~0.1 s a launch, ~2 minutes for a full check)
        fast = backend == "triton" and device == "cpu"
        with tk.use_backend(backend):
            assert torch.autograd.gradgradcheck(lambda t: tk.token_shift(t, T, fd, off), (x,),
                                                fast_mode=fast)


def test_third_order():
    """Any order: gx = S^T g, d<gx, h>/dg = S h (the forward), d<S h, k>/dh = S^T k."""
    x, g, h = (randn(2 * 3, 11, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k = randn(2 * 3, 11, 4, dtype=torch.float64)
    with tk.use_backend("cpp"):
        (gx,) = torch.autograd.grad(tk.token_shift(x, 3), x, g, create_graph=True)
        (gg,) = torch.autograd.grad(gx, g, h, create_graph=True)
        (ggg,) = torch.autograd.grad(gg, h, k)
    assert torch.equal(gg, ref_token_shift(h, 3))
    assert torch.equal(ggg, torch.autograd.grad(ref_token_shift(x, 3), x, k)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = randn(6, 13, 5, device=device, requires_grad=True)
    for backend in ["", *fused_backends(device, ("cpp", "cuda"))]:
        torch.library.opcheck(torch.ops.tvr.token_shift.default, (x, 3, 7, 3, backend))
        # with a gradient that requires grad: the backward op's own autograd (double backward)
        torch.library.opcheck(torch.ops.tvr.token_shift_backward.default, (x, 3, 7, 3, backend))


def test_compile_fullgraph():
    x = randn(2 * 4, 50, 8, requires_grad=True)
    f = torch.compile(lambda t: tk.token_shift(t, 4) * 2.0, fullgraph=True)
    y = f(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    yr = ref_token_shift(x, 4) * 2.0
    (gr,) = torch.autograd.grad(yr, x, g)
    assert torch.equal(y, yr) and torch.equal(gx, gr)


def test_backward_outside_backend_block_uses_forward_backend():
    x = randn(2 * 3, 10, 4, requires_grad=True)
    with tk.use_backend("reference"):
        y = tk.token_shift(x, 3)
    y.backward(torch.ones_like(y))  # resolved with the recorded backend, not the default
    (gr,) = torch.autograd.grad(ref_token_shift(x, 3), x, torch.ones_like(y))
    assert torch.equal(x.grad, gr)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.randn(12, 50), num_frames=12), ValueError, r"x must be 3-D or 4-D \[B\*T, N, C\]"),
    (dict(x=torch.randn(10, 50, 8), num_frames=12), ValueError, "divisible by num_frames"),
    (dict(x=torch.randn(2, 3, 50, 8), num_frames=12), ValueError, "x.shape\\[1\\] must equal num_frames"),
    (dict(x=torch.randn(12, 6, 8), num_frames=12), ValueError, "fold = N // fold_div must be >= 1"),
    (dict(x=torch.randn(12, 50, 8), num_frames=0), ValueError, "num_frames must be >= 1"),
    (dict(x=torch.randn(12, 50, 8), num_frames=12, offset=-1), ValueError, "offset must be >= 0"),
    (dict(x=torch.randn(12, 50, 8), num_frames=12, fold_div=0), ValueError, "fold_div must be >= 1"),
    (dict(x=torch.randint(0, 5, (12, 50, 8)), num_frames=12), TypeError, "x must have dtype"),
    (dict(x=[[1.0]], num_frames=12), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(12, 50, 8), num_frames=12.0), TypeError, "num_frames must be an int"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.token_shift(**kwargs)
    with pytest.raises(err, match=match):
        ref_token_shift(**kwargs)
