"""``python -m tvr_kernels.info``: which backends this installation can run."""
import platform

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


if __name__ == "__main__":
    print(report())
