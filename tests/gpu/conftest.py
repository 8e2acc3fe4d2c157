"""The GPU suite: recbole-ssm's fused path (mamba-ssm's and causal-conv1d's kernels) against its
PyTorch path, on a CUDA device with the ``[cuda]`` extra installed. benchmarks/gpu_check.py runs it.

Without CUDA only test_gpu_device.py is collected, and it is skipped with one reason
(settings.WITHOUT_CUDA): the only skip of the test suite. Where CUDA is present but a kernel is
missing, the tests fail (``ssm_backend="cuda"`` says which kernel and why), they do not skip.
Tolerances: settings.py.
"""
from pathlib import Path

import pytest
import torch

from tests.gpu.settings import relative_error

GATE = "test_gpu_device.py"
collect_ignore = [] if torch.cuda.is_available() else sorted(
    path.name for path in Path(__file__).parent.glob("test_*.py") if path.name != GATE)


@pytest.fixture
def check_close(record_property):
    """check_close(got, expected, tolerance, what): assert the relative error, and record it."""

    def check(got, expected, tolerance, what):
        error = relative_error(got, expected)
        record_property(what, f"{error:.3e} (bound {tolerance:.0e})")
        assert error <= tolerance, (f"{what}: relative error {error:.3e} exceeds {tolerance:.0e} "
                                    f"(shapes {tuple(got.shape)} / {tuple(expected.shape)})")

    return check
