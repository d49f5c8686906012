"""Backend selection: which implementation of an op runs for a given call.

Backends:
  * ``reference`` -- the pure-PyTorch code in :mod:`tvr_kernels.reference` (any device).
  * ``cpp``       -- the fused C++ CPU kernels of the extension ``tvr_kernels._C``.
  * ``triton``    -- Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
  * ``cuda``      -- CUDA C++ kernels of the extension (only when it was built with CUDA).

Availability is decided from facts (is the extension importable, is triton importable, is CUDA
available, is the interpreter on), never by launching a kernel and catching the failure.

The forced backend is per thread: two threads in their own ``use_backend`` blocks do not see
each other's choice. The autograd engine runs CUDA backward passes on its own worker threads,
which see no block at all; that is why each op records the backend requested at forward time
and passes it to its backward op, so a backward uses the forward's backend on any thread and
after the ``with`` block has ended.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Iterator, Sequence

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")

_local = threading.local()


def _stack() -> list[str]:
    """This thread's stack of forced backends (innermost last)."""
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = []
    return stack


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when the C++ extension ``tvr_kernels._C`` is built and loads."""
    if os.environ.get("TVR_KERNELS_NO_EXT") == "1":  # simulate a pure-Python install (tests)
        return False
    try:
        from . import _C  # noqa: F401  (loading the .so registers the tvr_C ops)
    except ImportError:
        return False
    return True


def extension_has_cuda(op: str = "token_shift_fwd") -> bool:
    """True when the extension carries CUDA kernels (it was built as a CUDAExtension)."""
    if not extension_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tvr_C::{op}", "CUDA")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by tvr_kernels.compile_check while it records launches: Triton launchers then accept CPU
# tensors (nothing runs; each launch is compiled for a GPU target instead).
_launch_capture = False


def triton_on_cpu() -> bool:
    """True when the triton backend takes CPU tensors: the interpreter, or launch capture."""
    return triton_interpret() or _launch_capture


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _why_unavailable(name: str) -> str | None:
    """None when backend ``name`` can run somewhere in this process, else the reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    if name == "reference":
        return None
    if name == "cpp":
        return None if extension_available() else (
            "the C++ extension tvr_kernels._C is not built (pure-Python install); "
            "build it with `pip install --no-build-isolation -e .`")
    if name == "triton":
        if not triton_importable():
            return "triton is not installed"
        if not (cuda_available() or triton_on_cpu()):
            return "triton needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU tensors"
        return None
    if not cuda_available():
        return "the cuda backend needs a CUDA device"
    if not extension_has_cuda():
        return "tvr_kernels._C was built without CUDA kernels"
    return None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if _why_unavailable(b) is None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op called inside the block (and its backward) onto backend ``name``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the backend cannot
    run in this process.  Example::

        with tk.use_backend("reference"):
            y = tk.token_shift(x, num_frames=12)
    """
    why = _why_unavailable(name)
    if why is not None:
        if name not in BACKENDS:
            raise ValueError(why)
        raise RuntimeError(f"backend {name!r} is unavailable: {why}")
    stack = _stack()
    stack.append(name)
    depth = len(stack)
    try:
        yield
    finally:
        # remove this block's own entry (a generator closed out of order must not take
        # another block's)
        if len(stack) >= depth and stack[depth - 1] == name:
            del stack[depth - 1]
        else:
            stack.remove(name)


def requested_backend() -> str:
    """The backend forced by this thread's innermost ``use_backend`` block, or '' for
    automatic."""
    stack = _stack()
    return stack[-1] if stack else ""


def resolve(op: str, device: torch.device, requested: str, supported: Sequence[str],
            gpu_default: str = "triton") -> str:
    """Pick the implementation of ``op`` for tensors on ``device``.

    ``requested`` is '' (automatic) or a backend name from :func:`use_backend`;
    ``supported`` lists the backends ``op`` implements.
    """
    if requested:
        if requested not in supported:
            raise NotImplementedError(
                f"tvr::{op} has no {requested!r} backend (it has {tuple(supported)})")
        if requested == "cpp" and device.type != "cpu":
            raise RuntimeError(f"tvr::{op}: the cpp backend takes CPU tensors, got {device}")
        if requested == "cuda" and device.type != "cuda":
            raise RuntimeError(f"tvr::{op}: the cuda backend takes CUDA tensors, got {device}")
        if requested == "triton" and device.type == "cpu" and not triton_on_cpu():
            raise RuntimeError(
                f"tvr::{op}: triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                "tvr_kernels' Triton modules are imported")
        return requested
    if device.type == "cpu":
        return "cpp" if extension_available() and "cpp" in supported else "reference"
    if device.type == "cuda":
        if gpu_default == "cuda" and "cuda" in supported and extension_has_cuda():
            return "cuda"
        if "triton" in supported and triton_importable():
            return "triton"
        if "cuda" in supported and extension_has_cuda():
            return "cuda"
    _warn_reference_fallback(op, device)
    return "reference"


_fallback_warned: set[tuple[str, str]] = set()


def _warn_reference_fallback(op: str, device: torch.device) -> None:
    """One warning per (op, device type) when an accelerator tensor runs the eager reference:
    a user who expected a fused kernel must learn that they did not get one."""
    key = (op, device.type)
    if key in _fallback_warned:
        return
    _fallback_warned.add(key)
    why = ("triton is not importable" if device.type == "cuda" and not triton_importable()
           else f"no fused backend handles {device.type} tensors")
    warnings.warn(f"tvr::{op} on {device.type} tensors runs the eager reference ({why}); "
                  "`python -m tvr_kernels.info` shows the available backends.",
                  RuntimeWarning, stacklevel=4)


_warned = False


def warn_if_pure_python() -> None:
    """One warning per process when the C++ extension is missing."""
    global _warned
    if not _warned and not extension_available():
        _warned = True
        warnings.warn(
            "tvr_kernels._C (the C++ extension) is not available: CPU ops fall back to the "
            "pure-PyTorch reference. Build it with `pip install --no-build-isolation -e .`; "
            "`python -m tvr_kernels.info` shows the available backends.",
            RuntimeWarning, stacklevel=3)
