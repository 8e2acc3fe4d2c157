"""Our depthwise convolution against torch's grouped nn.Conv1d."""
import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.ops.conv import depthwise_conv1d


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("causal,width", [(True, 4), (True, 1), (False, 7), (False, 3)])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("length", [11, 2])   # 2: shorter than most widths
def test_matches_grouped_conv1d(causal, width, activation, length, backend):
    torch.manual_seed(0)
    channels = 6
    conv = torch.nn.Conv1d(channels, channels, width, groups=channels,
                           padding=width - 1 if causal else width // 2).double()
    x = torch.randn(3, channels, length, dtype=torch.float64, requires_grad=True)
    expected = conv(x)[..., :length]
    if activation == "silu":
        expected = F.silu(expected)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
    got = depthwise_conv1d(x, conv.weight, conv.bias, causal=causal, activation=activation, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for got_grad, expected_grad in zip(torch.autograd.grad(got, (x, conv.weight, conv.bias), grad), expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)
    with torch.no_grad():  # without autograd (the compiled op's inference path)
        torch.testing.assert_close(depthwise_conv1d(x, conv.weight, conv.bias, causal=causal, activation=activation,
                                                    backend=backend), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_compiled_gradcheck_and_no_bias(causal):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: depthwise_conv1d(*a, causal=causal, backend="numba"), (x, weight, bias))
    torch.testing.assert_close(depthwise_conv1d(x, weight, causal=causal, backend="numba"),
                               depthwise_conv1d(x, weight, causal=causal, backend="torch"), rtol=0, atol=1e-12)


def test_compiled_float32_and_threads():
    torch.manual_seed(2)
    conv = torch.nn.Conv1d(40, 40, 4, groups=40, padding=3)
    x = torch.randn(5, 40, 30, requires_grad=True)
    expected = F.silu(conv(x)[..., :30])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            got = depthwise_conv1d(x, conv.weight, conv.bias, backend="numba")
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            grads = torch.autograd.grad(got.square().sum(), (x, conv.weight, conv.bias))
            expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias),
                                                 retain_graph=True)
            for got_grad, expected_grad in zip(grads, expected_grads):
                torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_centred_needs_odd_width():
    with pytest.raises(ValueError, match="odd width"):
        depthwise_conv1d(torch.zeros(1, 2, 5), torch.zeros(2, 1, 4), causal=False)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("causal,width", [(True, 4), (False, 3)])
def test_keeps_the_input_dtype_under_autocast(causal, width, backend):
    # Under autocast the activations are bfloat16 while the weight stays float32; the result has the
    # activations' dtype, as causal-conv1d's has (the selective scan needs u in delta's dtype).
    conv = torch.nn.Conv1d(8, 8, width, groups=8, padding=width - 1 if causal else width // 2)
    x = torch.randn(2, 8, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = depthwise_conv1d(x, conv.weight, conv.bias, causal=causal, backend=backend)
    assert got.dtype == torch.bfloat16
    expected = F.silu(conv(x.float())[..., :10] if causal else conv(x.float()))
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
