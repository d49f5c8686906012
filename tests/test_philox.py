"""The counter-based generator gives the same bits on every backend."""
import pytest
import torch

from tvr_kernels import _backend, _philox

from conftest import DEVICES, fused_backends

# 1 and 2**32 + 7 have a key word equal to 1, which Triton would specialise to a constexpr.
SEEDS = [0, 1, 2 ** 32 + 7, 2 ** 62 + 12345]
# cuda variants are collected everywhere and skipped without a device (DEVICES has no cuda).
DEVICE_PARAMS = [pytest.param(d, marks=pytest.mark.skipif(d not in DEVICES,
                                                          reason="no CUDA device"))
                 for d in ("cpu", "cuda")]


def test_known_answer():
    # Random123's published vector for Philox4x32-10 with zero counter and key.
    got = _philox.philox4x32_10(0, 0, 0, 0, 0)
    assert [int(v) for v in got] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("seed", SEEDS)
def test_backends_agree_bitwise(seed, device):
    """Integer arithmetic only: every backend, on every device, gives the same bits."""
    c = torch.randint(0, 2 ** 32, (777, 4), dtype=torch.int64)
    want = torch.stack(_philox.philox4x32_10(c[:, 0], c[:, 1], c[:, 2], c[:, 3], seed), 1)
    if device == "cpu" and _backend.extension_available():
        assert torch.equal(torch.ops.tvr_C.philox(c, seed), want)
    if "triton" in fused_backends(device, ("triton",)):
        from tvr_kernels.triton.philox import philox
        assert torch.equal(philox(c.to(device), seed).cpu(), want)
    # the torch transcription itself on the device (the references draw through it)
    cd = c.to(device)
    got = torch.stack(_philox.philox4x32_10(cd[:, 0], cd[:, 1], cd[:, 2], cd[:, 3], seed), 1)
    assert torch.equal(got.cpu(), want)


def test_uniform_and_normal_statistics():
    n = 200_000
    i = torch.arange(n)
    a, b, _, _ = _philox.philox4x32_10(i, 0, 0, 0, 1234)
    u = _philox.unit_float(a)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 5e-3 and abs(u.var() - 1 / 12) < 2e-3
    z0, z1 = _philox.box_muller(a, b)
    for z in (z0, z1):
        assert abs(z.mean()) < 1e-2 and abs(z.var() - 1) < 2e-2
    assert abs(torch.corrcoef(torch.stack([z0, z1]))[0, 1]) < 1e-2


# Compiles (never runs) the Triton kernels that draw Philox numbers for an sm_90 GPU, through
# their launchers, in a process without TRITON_INTERPRET: the interpreter accepts code that the
# compiler rejects (non-constexpr globals, loop-carried values changing shape, `.to()` on an int
# argument of 1 that Triton specialised to a constexpr). Seeds 1 and 2**32 + 7 have a key word
# equal to 1.
_COMPILE_SCRIPT = r"""
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    assert hasattr(JITFunction, "_pack_args")
except (ImportError, AssertionError) as e:
    print("NO_COMPILER_API", repr(e))
    sys.exit(0)
import torch
import tvr_kernels.triton.perturbed_topk as ptk
import tvr_kernels.triton.philox as phx
import tvr_kernels.triton.stochastic_max_similarity as sms
from tvr_kernels.reference.stochastic_max_similarity import STREAM_KEY

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
compiled = []


class Compile:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
            bound, spec, opts = binder(*args, **kwargs)
            options, sig, constexprs, attrs = self.fn._pack_args(backend, kwargs, bound, spec,
                                                                 opts)
            triton.compile(ASTSource(self.fn, sig, constexprs, attrs), target=target,
                           options=options.__dict__)
            compiled.append(self.fn.__name__)
        return launch


for mod, name in [(ptk, "_perturbed_topk_fwd_kernel"), (ptk, "_perturbed_topk_bwd_kernel"),
                  (phx, "_philox_test_kernel"), (sms, "_smsim_fwd_kernel"),
                  (sms, "_smsim_bwd_kernel")]:
    setattr(mod, name, Compile(getattr(mod, name)))

scores = torch.randn(4, 49)
ptk.perturbed_topk_fwd(scores, 3, 8, 0.05, None, 1, False, False)
ptk.perturbed_topk_fwd(scores, 3, 8, 0.05, None, 2 ** 32 + 7, True, False)
ptk.perturbed_topk_fwd(scores, 3, 8, 0.05, torch.randn(4, 8, 49), 0, False, False)
ptk.perturbed_topk_bwd(torch.randn(4, 3, 49), torch.randn(4, 3, 49), 8, 0.05)
phx.philox(torch.zeros(5, 4, dtype=torch.int64), 1)
phx.philox(torch.zeros(5, 4, dtype=torch.int64), 2 ** 32 + 7)
Nt, Nv, T, D, M = 3, 5, 12, 7, 4
inp = [torch.randn(Nt, D), torch.randn(Nv, T, D), torch.randn(Nv, Nt, D), torch.randn(D, T),
       torch.randn(D)]
best = torch.zeros(Nt, Nv, dtype=torch.int64)
for prior, seed, noise in [("uniform", STREAM_KEY ^ 1, None),  # Philox key word 1
                           ("normal", STREAM_KEY ^ (2 ** 32 + 7), None),
                           ("uniform", 0, torch.rand(Nt, Nv, M, D))]:
    sms.stochastic_max_similarity_fwd(*inp, M, prior, 0.5, seed, noise, 0, 1)
    # the torch epilogue runs on the kernel's never-written buffers: values are meaningless
    sms.stochastic_max_similarity_bwd(torch.randn(Nt, Nv), *inp, best, M, prior, 0.5, seed,
                                      noise, 1, 0)
print("COMPILED", len(compiled))
"""


def test_triton_kernels_compile_for_sm90():
    import os
    import pathlib
    import subprocess
    import sys

    if not _backend.triton_importable():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    if "NO_COMPILER_API" in r.stdout:
        pytest.skip(f"this triton lacks the internals used to compile without a GPU: {r.stdout}")
    assert "COMPILED 12" in r.stdout, r.stdout + r.stderr[-2000:]
