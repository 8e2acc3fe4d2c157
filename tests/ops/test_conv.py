"""Our depthwise convolution against torch's grouped nn.Conv1d."""
import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.ops.conv import depthwise_conv1d


@pytest.mark.parametrize("causal,width", [(True, 4), (True, 1), (False, 7), (False, 3)])
@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_grouped_conv1d(causal, width, activation):
    torch.manual_seed(0)
    channels, length = 6, 11
    conv = torch.nn.Conv1d(channels, channels, width, groups=channels,
                           padding=width - 1 if causal else width // 2).double()
    x = torch.randn(3, channels, length, dtype=torch.float64)
    expected = conv(x)[..., :length]
    if activation == "silu":
        expected = F.silu(expected)
    got = depthwise_conv1d(x, conv.weight, conv.bias, causal=causal, activation=activation)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_centred_needs_odd_width():
    with pytest.raises(ValueError, match="odd width"):
        depthwise_conv1d(torch.zeros(1, 2, 5), torch.zeros(2, 1, 4), causal=False)


@pytest.mark.parametrize("causal,width", [(True, 4), (False, 3)])
def test_keeps_the_input_dtype_under_autocast(causal, width):
    # Under autocast the activations are bfloat16 while the weight stays float32; the result has the
    # activations' dtype, as causal-conv1d's has (the selective scan needs u in delta's dtype).
    conv = torch.nn.Conv1d(8, 8, width, groups=8, padding=width - 1 if causal else width // 2)
    x = torch.randn(2, 8, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = depthwise_conv1d(x, conv.weight, conv.bias, causal=causal, backend="torch")
    assert got.dtype == torch.bfloat16
    expected = F.silu(conv(x.float())[..., :10] if causal else conv(x.float()))
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
