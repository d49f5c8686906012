"""Kernels with the defects the GPU compile check must catch, launched through its recorder
(run by tests/test_compile_check.py in a process without TRITON_INTERPRET)."""
import json
import sys

import torch
import triton
import triton.language as tl

from tvr_kernels import compile_check as cc
from tvr_kernels.triton import device_guard

_PLAIN_GLOBAL = 3  # not a constexpr: the compiler rejects reading it in a kernel


@triton.jit
def _reads_plain_global_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) * _PLAIN_GLOBAL)


@triton.jit
def _casts_int_arg_kernel(x_ptr, n):
    # an int argument equal to 1 arrives as a constexpr, which has no .to()
    tl.store(x_ptr, tl.load(x_ptr) + n.to(tl.float32))


@triton.jit
def _shape_changing_loop_kernel(x_ptr, k, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    acc = tl.zeros((1, BLOCK), tl.float32)
    for _ in range(k):
        acc = acc + tl.zeros((BLOCK, BLOCK), tl.float32)  # [1, B] -> [B, B]: rejected
    tl.store(x_ptr + i, tl.sum(acc, axis=0))


@triton.jit
def _big_dot_kernel(a_ptr, c_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
    b = tl.load(a_ptr + BLOCK * BLOCK + i[:, None] * BLOCK + i[None, :])
    c = tl.dot(a, b)
    tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], c)


@triton.jit
def _scale_kernel(x_ptr, n, s, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * s, mask=i < n)


def main() -> None:
    x = torch.randn(64 * 64)
    with cc.recording() as launches:
        _reads_plain_global_kernel[(1,)](x)
        _casts_int_arg_kernel[(1,)](x, 1)
        _casts_int_arg_kernel[(1,)](x, 2)
        _shape_changing_loop_kernel[(1,)](x, 3, BLOCK=16)
        _big_dot_kernel[(1,)](torch.randn(512, 256).half(), torch.empty(256, 256), BLOCK=256)
        _scale_kernel[(4, 70000)](x, x.numel(), 2.0, BLOCK=128)
        with device_guard(x):
            _scale_kernel[(64,)](x, x.numel(), 2.0, BLOCK=64)
    names = ["plain_global", "int_arg_1", "int_arg_2", "loop_shape", "big_dot", "big_grid", "good"]
    for launch, name in zip(launches, names):
        launch.case = name
    results = cc.compile_all(launches, [int(sys.argv[1])], jobs=1)
    print(json.dumps({r.cases[0]: dict(error=r.error, smem_ok=r.smem_ok, grid_ok=r.grid_ok,
                                       regs=r.regs, spills=r.spills, smem=r.smem,
                                       unguarded=r.unguarded)
                      for r in results}))


if __name__ == "__main__":
    main()
