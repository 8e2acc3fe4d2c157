"""Gated RMSNorm against the formulas written out."""
import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.modules.norm import RMSNormGated


def rms(v, eps=1e-5):
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("group_size", [None, 3, 6])
def test_gated_rmsnorm(group_size):
    torch.manual_seed(0)
    x, z = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    weight = torch.randn(12, dtype=torch.float64)
    gs = 12 if group_size is None else group_size

    def grouped(v):  # rmsnorm of each run of gs features
        return torch.cat([rms(v[..., i:i + gs]) for i in range(0, 12, gs)], dim=-1)

    expected = {
        True: grouped(x) * weight * (z * torch.sigmoid(z)),
        False: grouped(x * z * torch.sigmoid(z)) * weight,
    }
    for norm_before_gate, y_ref in expected.items():
        norm = RMSNormGated(12, group_size=group_size, norm_before_gate=norm_before_gate).double()
        assert [(n, tuple(p.shape)) for n, p in norm.named_parameters()] == [("weight", (12,))]
        assert norm.eps == 1e-5
        with torch.no_grad():
            norm.weight.copy_(weight)
        torch.testing.assert_close(norm(x, z), y_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(norm(x), grouped(x) * weight, rtol=0, atol=1e-12)


def test_half_precision_input_is_computed_in_float32():
    x = torch.randn(3, 8).to(torch.bfloat16)
    y = RMSNormGated(8)(x, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), rms(x.float()) * F.silu(x.float()), rtol=1e-2, atol=1e-2)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size"):
        RMSNormGated(10, group_size=4)


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_gradcheck(group_size, norm_before_gate, gated):
    """Gradients with respect to x, z and the weight."""
    generator = torch.Generator().manual_seed(0)
    norm = RMSNormGated(6, group_size=group_size, norm_before_gate=norm_before_gate).double()
    x, z, weight = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
                    for shape in ((2, 3, 6), (2, 3, 6), (6,)))

    def normalise(x, weight, z=None):
        return torch.func.functional_call(norm, {"weight": weight}, (x, z))

    assert torch.autograd.gradcheck(normalise, (x, weight, z) if gated else (x, weight))
