"""``python -m tvr_kernels.info``: which backends this installation can run.

``python -m tvr_kernels.info --compile sm_80,sm_90`` also compiles every Triton launch of the
ops for those GPU targets (no GPU needed; see :mod:`tvr_kernels.compile_check`) and prints
registers, spills and shared memory per kernel and shape.
"""
import argparse
import platform
import sys

import torch

from . import _backend


def report() -> str:
    lines = [
        f"tvr_kernels  python {platform.python_version()}  torch {torch.__version__}",
        f"  C++ extension tvr_kernels._C built : {_backend.extension_available()}",
        f"  extension has CUDA kernels       : {_backend.extension_has_cuda()}",
        f"  triton importable                : {_backend.triton_importable()}"
        + (f" ({__import__('triton').__version__})" if _backend.triton_importable() else ""),
        f"  CUDA device available            : {_backend.cuda_available()}"
        + (f" ({torch.cuda.get_device_name()})" if _backend.cuda_available() else ""),
        f"  TRITON_INTERPRET (Triton on CPU) : {_backend.triton_interpret()}",
        f"  usable backends                  : {', '.join(_backend.available_backends())}",
        f"  default for CPU tensors          : {_backend.resolve('token_shift', torch.device('cpu'), '', _backend.BACKENDS)}",
    ]
    if _backend.cuda_available():
        lines.append("  default for CUDA tensors         : "
                     + _backend.resolve("token_shift", torch.device("cuda"), "", _backend.BACKENDS))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvr_kernels.info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", metavar="ARCHS", default="",
                    help="compile every Triton launch for these targets, e.g. sm_90 or sm_80,sm_90")
    ap.add_argument("--ops", default="", help="with --compile: comma-separated ops (default: all)")
    ap.add_argument("--paper-only", action="store_true", help="with --compile: papers' shapes only")
    args = ap.parse_args(argv)
    print(report(), flush=True)
    if not args.compile:
        return 0
    from . import compile_check
    return compile_check.run_report(compile_check.parse_archs(args.compile),
                                    [o for o in args.ops.split(",") if o], args.paper_only)


if __name__ == "__main__":
    sys.exit(main())
