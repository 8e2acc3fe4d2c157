"""The gate of the GPU suite: without CUDA, this module alone is collected (conftest.py) and it is
skipped with the reason pytest prints. With CUDA, the device computes."""
import pytest
import torch

from tests.gpu.settings import DEVICE, WITHOUT_CUDA

if not torch.cuda.is_available():
    pytest.skip(WITHOUT_CUDA, allow_module_level=True)

pytestmark = pytest.mark.gpu


def test_device_computes_a_float32_product():
    """A product on the GPU equals the CPU's to float32 rounding (PyTorch's default: no TF32)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    product = (a.float().to(DEVICE) @ a.float().to(DEVICE)).cpu().double()
    assert ((product - a @ a).norm() / (a @ a).norm()).item() < 1e-5
