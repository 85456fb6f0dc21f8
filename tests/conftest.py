"""Test setup: Triton runs in its interpreter on the CPU when there is no CUDA.

``TRITON_INTERPRET`` must be set before ``triton`` is imported anywhere, so it is set here at
collection time.
"""

import os

try:  # decide without importing triton
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models only lose time to OpenMP on a shared 2-core machine.
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
