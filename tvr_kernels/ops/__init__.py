"""Custom-op registration, autograd and backend choice, one module per op.

Schemas are declared in Python with ``torch.library.custom_op`` (namespace ``tvr``), not in
C++: an op must exist on a pure-Python install (falling back to the reference) and must be
able to launch Triton kernels, both of which need the Python registration anyway, so a
single Python declaration keeps each schema in one place. The C++ and CUDA kernels are
private ``tvr_C::*`` dispatcher ops called from the Python op bodies.
"""
