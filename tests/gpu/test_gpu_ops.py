"""Each op through its fused kernel against our PyTorch path, on the GPU: outputs and gradients in
float32, and the forward under bfloat16 autocast."""
from dataclasses import dataclass

import pytest
import torch

from recbole_ssm.ops.conv import cuda as conv_cuda
from recbole_ssm.ops.conv import depthwise_conv1d
from recbole_ssm.ops.gated_rmsnorm import cuda as norm_cuda
from recbole_ssm.ops.gated_rmsnorm import gated_rmsnorm
from recbole_ssm.ops.selective_scan import cuda as scan_cuda
from recbole_ssm.ops.selective_scan import selective_scan
from recbole_ssm.ops.ssd import cuda as ssd_cuda
from recbole_ssm.ops.ssd import ssd_scan
from tests.gpu.settings import (BF16_AUTOCAST, DEVICE, FLOAT32_ROUNDING, FUSED, REFERENCE, SELECTIVE_SCAN,
                                  SSD)
from tests.selective_scan_reference import random_inputs

pytestmark = pytest.mark.gpu

KERNELS = {"causal convolution": conv_cuda.KERNEL, "selective scan": scan_cuda.KERNEL,
           "SSD scan": ssd_cuda.KERNEL, "gated RMSNorm": norm_cuda.KERNEL}


@pytest.mark.parametrize("op", KERNELS)
def test_kernel_loads(op):
    """The kernel and its compiled extension import (the error says which package and why not)."""
    assert callable(KERNELS[op].load())


@dataclass
class Case:
    """An op on named inputs: ``run(backend, **inputs)`` returns its outputs, of which the first
    ``differentiable`` enter the loss; ``activations`` are the inputs that are bfloat16 under autocast
    (the others are parameters, float32)."""
    run: object
    inputs: dict
    tolerance: float
    activations: tuple
    differentiable: int = 1


def randn(*shape, generator):
    return torch.randn(*shape, generator=generator)


def conv_case(dim, width, batch=3, length=50):
    g = torch.Generator().manual_seed(dim + width)
    # As in the blocks: x is a channel-last slice of the input projection's output.
    run = lambda backend, rows, weight, bias: depthwise_conv1d(  # noqa: E731
        rows.transpose(1, 2)[:, :dim], weight, bias, backend=backend)
    inputs = {"rows": randn(batch, length, 2 * dim, generator=g), "weight": randn(dim, 1, width, generator=g),
              "bias": randn(dim, generator=g)}
    return Case(run, inputs, FLOAT32_ROUNDING, activations=("rows",))


def scan_case(d_state, return_last_state, length=100):
    inputs = random_inputs(batch=3, d=64, n=d_state, length=length, dtype=torch.float32, seed=d_state)
    run = lambda backend, **kw: selective_scan(  # noqa: E731
        **kw, delta_softplus=True, return_last_state=return_last_state, backend=backend)
    # The last state is not differentiable in our implementations: only y enters the loss.
    return Case(run, inputs, SELECTIVE_SCAN, activations=("u", "delta", "B", "C", "z"))


def ssd_case(masked, b=2, length=100, h=8, p=16, g=2, n=32, chunk_size=32):
    gen = torch.Generator().manual_seed(int(masked))
    inputs = {"x": randn(b, length, h, p, generator=gen), "dt": torch.rand(b, length, h, generator=gen) + 0.05,
              "A": -(torch.rand(h, generator=gen) * 2 + 0.1), "B": randn(b, length, g, n, generator=gen),
              "C": randn(b, length, g, n, generator=gen), "D": randn(h, generator=gen),
              "initial_states": randn(b, h, p, n, generator=gen)}
    mask = (torch.arange(length) < torch.tensor([length, 37])[:, None]).to(DEVICE) if masked else None
    run = lambda backend, **kw: ssd_scan(  # noqa: E731
        **kw, chunk_size=chunk_size, return_final_states=True, mask=mask, backend=backend)
    return Case(run, inputs, SSD, activations=("x", "B", "C"), differentiable=2)


def norm_case(group_size, norm_before_gate, d=128):
    gen = torch.Generator().manual_seed(d)
    inputs = {"x": randn(2, 50, d, generator=gen), "z": randn(2, 50, d, generator=gen),
              "weight": 1 + 0.3 * randn(d, generator=gen)}
    run = lambda backend, **kw: gated_rmsnorm(  # noqa: E731
        **kw, group_size=group_size, norm_before_gate=norm_before_gate, backend=backend)
    return Case(run, inputs, FLOAT32_ROUNDING, activations=("x", "z"))


CASES = {
    "conv dim 128 width 4": lambda: conv_case(128, 4),
    "conv dim 100 width 3 (copied to a layout it reads)": lambda: conv_case(100, 3),
    "conv dim 64 width 2": lambda: conv_case(64, 2),
    "selective scan d_state 16": lambda: scan_case(16, return_last_state=False),
    "selective scan d_state 32, last state": lambda: scan_case(32, return_last_state=True),
    "ssd initial and final states": lambda: ssd_case(masked=False),
    "ssd masked": lambda: ssd_case(masked=True),
    "gated rmsnorm whole, gate after": lambda: norm_case(None, True),
    "gated rmsnorm groups of 64, gate before": lambda: norm_case(64, False),
}


def outputs(result):
    return result if isinstance(result, tuple) else (result,)


def forward_backward(case, backend, autocast=False, gradients=True):
    """The case's outputs, and the gradients of a fixed random projection of them."""
    leaves = {}
    for name, tensor in case.inputs.items():
        tensor = tensor.to(DEVICE, copy=True)
        if autocast and name in case.activations:
            tensor = tensor.bfloat16()
        leaves[name] = tensor.requires_grad_(gradients)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        result = outputs(case.run(backend, **leaves))
    if not gradients:
        return result, {}
    g = torch.Generator().manual_seed(7)
    loss = sum((out.float() * torch.randn(out.shape, generator=g).to(DEVICE)).sum()
               for out in result[:case.differentiable])
    loss.backward()
    return result, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("name", CASES)
def test_float32_outputs_and_gradients(name, check_close):
    case = CASES[name]()
    got, got_grads = forward_backward(case, FUSED)
    expected, expected_grads = forward_backward(case, REFERENCE)
    assert [o.dtype for o in got] == [o.dtype for o in expected]
    for index, (out, ref) in enumerate(zip(got, expected)):
        check_close(out, ref, case.tolerance, f"{name}: output {index}")
    for input_name, ref in expected_grads.items():
        check_close(got_grads[input_name], ref, case.tolerance, f"{name}: d/d{input_name}")


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_autocast_forward(name, check_close):
    """Under autocast the fused path returns what our PyTorch path returns under autocast (dtypes),
    close to the float32 result."""
    case = CASES[name]()
    got, _ = forward_backward(case, FUSED, autocast=True, gradients=False)
    same_setting, _ = forward_backward(case, REFERENCE, autocast=True, gradients=False)
    float32, _ = forward_backward(case, REFERENCE, gradients=False)
    assert [o.dtype for o in got] == [o.dtype for o in same_setting]
    for index, (out, ref) in enumerate(zip(got, float32)):
        check_close(out.float(), ref, BF16_AUTOCAST, f"{name}: output {index} under autocast")
