"""Gated RMSNorm against the formulas written out."""
import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.modules.norm import RMSNormGated
from tests.conftest import CPU_BACKENDS


def rms(v, eps=1e-5):
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("group_size", [None, 3, 6])
def test_gated_rmsnorm(group_size, backend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, dtype=torch.float64)
    gs = 12 if group_size is None else group_size

    def grouped(v):  # rmsnorm of each run of gs features
        return torch.cat([rms(v[..., i:i + gs]) for i in range(0, 12, gs)], dim=-1)

    expected = {
        True: lambda w: grouped(x) * w * (z * torch.sigmoid(z)),
        False: lambda w: grouped(x * z * torch.sigmoid(z)) * w,
    }
    grad = torch.randn(2, 5, 12, dtype=torch.float64)
    for norm_before_gate, reference in expected.items():
        norm = RMSNormGated(12, group_size=group_size, norm_before_gate=norm_before_gate, backend=backend).double()
        assert [(n, tuple(p.shape)) for n, p in norm.named_parameters()] == [("weight", (12,))]
        assert norm.eps == 1e-5
        with torch.no_grad():
            norm.weight.copy_(weight)
        for got, y_ref in ((norm(x, z), reference(norm.weight)), (norm(x), grouped(x) * norm.weight)):
            torch.testing.assert_close(got, y_ref, rtol=0, atol=1e-12)
            got_grads = torch.autograd.grad(got, (x, z, norm.weight), grad, allow_unused=True)
            ref_grads = torch.autograd.grad(y_ref, (x, z, norm.weight), grad, allow_unused=True)
            for got_grad, ref_grad in zip(got_grads, ref_grads):
                if ref_grad is None:
                    assert got_grad is None or not got_grad.any()
                else:
                    torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=1e-12)
        with torch.no_grad():  # without autograd (the compiled op's inference path)
            torch.testing.assert_close(norm(x, z), reference(norm.weight), rtol=0, atol=1e-12)


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
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(group_size, norm_before_gate, gated, backend):
    """Gradients with respect to x, z and the weight."""
    generator = torch.Generator().manual_seed(0)
    norm = RMSNormGated(6, group_size=group_size, norm_before_gate=norm_before_gate, backend=backend).double()
    x, z, weight = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
                    for shape in ((2, 3, 6), (2, 3, 6), (6,)))

    def normalise(x, weight, z=None):
        return torch.func.functional_call(norm, {"weight": weight}, (x, z))

    assert torch.autograd.gradcheck(normalise, (x, weight, z) if gated else (x, weight))


def test_auto_takes_the_compiled_kernel_for_large_inputs_only(record_calls):
    """``auto`` on the CPU: PyTorch below COMPILED_MIN_ELEMENTS (faster there), the compiled kernel
    from it on; ``numba`` always takes the kernel."""
    from recbole_ssm.ops import gated_rmsnorm as op
    from recbole_ssm.ops.gated_rmsnorm import fused

    calls = record_calls(fused, "gated_rmsnorm_fused")
    d = 64
    small = torch.randn(op.COMPILED_MIN_ELEMENTS // d - 1, d)
    large = torch.randn(op.COMPILED_MIN_ELEMENTS // d, d)
    weight = torch.rand(d)
    for x, backend in ((small, "auto"), (large, "auto"), (small, "numba")):
        got = op.gated_rmsnorm(x, weight, z=x.flip(-1), backend=backend)
        torch.testing.assert_close(got, op.gated_rmsnorm_torch(x, weight, x.flip(-1)), rtol=1e-5, atol=1e-5)
    assert [args[0].numel() for args in calls] == [large.numel(), small.numel()]
