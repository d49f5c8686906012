"""Triton kernels, one module per op. Imported lazily by :mod:`tvr_kernels.ops` so that a
machine without triton can still use the other backends. Set ``TRITON_INTERPRET=1`` before
these modules are imported to run them on CPU tensors (how CI tests them)."""
