"""Test-wide settings.

One intra-op thread per process: the tests use small shapes, and many of them start several processes
(gloo ranks, training subprocesses) on a 2-core machine, where OpenMP threads spinning against each
other make small matrix products tens of times slower.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skip them (with the reason shown) on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
