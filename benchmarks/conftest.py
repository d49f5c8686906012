"""pytest-benchmark integration (``pytest benchmarks/ --benchmark-only``): the conditions of
a run go into its saved JSON, so ``--benchmark-compare`` across commits shows what changed."""
import os

import pytest

# The Triton interpreter is a test vehicle: never time it.
os.environ.pop("TRITON_INTERPRET", None)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch
    import triton

    from benchmarks import records
    from benchmarks.common import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine_info.update(tvr_device=device_name(device), torch=torch.__version__,
                        triton=triton.__version__, threads=torch.get_num_threads(),
                        tvr_commit=records.commit())
