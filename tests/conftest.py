"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before
triton is first imported; with a GPU they run natively and the matrices grow (bf16, larger shapes).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_report_header(config):
    where = torch.cuda.get_device_name() if HAS_GPU else "CPU (Triton interpreter)"
    return f"flashtile tests on {where}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random data per test (seeded by the test's id)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
