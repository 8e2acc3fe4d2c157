"""Gradients: the pure-PyTorch selective scan's training path across batch slices, and gradcheck of
the depthwise convolution under every CPU backend."""
import pytest
import torch

from recbole_ssm.ops.conv import depthwise_conv1d
from recbole_ssm.ops.selective_scan import chunked, selective_scan_torch
from tests.conftest import CPU_BACKENDS
from tests.selective_scan_reference import random_inputs, recurrence


# 5 rows, d = 5, n = 4, length 29 in 5 chunks of 6: slices of 1 row; of 2, 2 and 1 rows (250 // (5 * 5 * 4)).
@pytest.mark.parametrize("slice_elements", [1, 250])
def test_selective_scan_gradients_across_batch_slices(monkeypatch, slice_elements):
    """Training scans the batch in slices, each recomputed in backward: every input's gradient, the
    parameters shared by all slices (A, D, delta_bias) included, equals the recurrence's."""
    monkeypatch.setattr(chunked, "CACHE_SLICE_ELEMENTS", slice_elements)
    inputs = {name: tensor.requires_grad_() for name, tensor in random_inputs(batch=5, length=29).items()}
    weights = torch.randn(5, 5, 29, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = selective_scan_torch(**inputs, delta_softplus=True, method="chunked")
    expected = recurrence(**inputs, delta_softplus=True)
    grads = torch.autograd.grad((got * weights).sum(), list(inputs.values()))
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(inputs.values()))
    for name, grad, expected_grad in zip(inputs, grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10,
                                   msg=lambda message: f"gradient of {name}: {message}")


@pytest.mark.parametrize("causal,width", [(True, 4), (True, 1), (False, 5), (False, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_depthwise_conv1d_gradcheck(causal, width, with_bias, activation, backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, width, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True) if with_bias else None

    def conv(x, weight, bias=None):
        return depthwise_conv1d(x, weight, bias, causal=causal, activation=activation, backend=backend)

    assert torch.autograd.gradcheck(conv, (x, weight) if bias is None else (x, weight, bias))
