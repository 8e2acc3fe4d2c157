"""MambaBlock: mamba-ssm's parameter layout, and its forward against mamba_simple's slow path,
written here with nn.Conv1d and an explicit step-by-step scan."""
import math

import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.modules.mamba import MambaBlock
from tests.conftest import CPU_BACKENDS
from tests.ssd_reference import assert_gradients_match, perturbed

# A per channel and state, D per channel, the step size bias per channel: all differ from their
# initial values (where every channel has the same A and D = 1), so a mix-up of channels shows.
SSM_PARAMETERS = ("A_log", "D", "dt_proj.bias", "conv1d.bias")


def make_block(backend="auto"):
    torch.manual_seed(0)
    return perturbed(MambaBlock(d_model=12, d_state=5, d_conv=3, expand=2, backend=backend), SSM_PARAMETERS)


def reference_forward(block, hidden_states):
    """Mamba's reference computation, one time step at a time."""
    length = hidden_states.shape[1]
    x, z = (hidden_states @ block.in_proj.weight.T).chunk(2, dim=-1)           # (b, l, d_inner)
    x = F.silu(F.conv1d(x.transpose(1, 2), block.conv1d.weight, block.conv1d.bias,
                        padding=block.d_conv - 1, groups=block.d_inner)[..., :length]).transpose(1, 2)
    dt, B, C = (x @ block.x_proj.weight.T).split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    delta = F.softplus(dt @ block.dt_proj.weight.T + block.dt_proj.bias)       # (b, l, d_inner)
    A = -torch.exp(block.A_log)
    h = torch.zeros(x.shape[0], block.d_inner, block.d_state, dtype=x.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + block.D * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ block.out_proj.weight.T


def test_parameters_as_mamba_ssm():
    block = MambaBlock(d_model=64, d_state=32, d_conv=4, expand=2)
    d_inner, dt_rank = 128, math.ceil(64 / 16)
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 64),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * 32, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, 32),
        "D": (d_inner,),
        "out_proj.weight": (64, d_inner),
    }


def test_initialisation():
    block = MambaBlock(d_model=32, d_state=8)
    torch.testing.assert_close(-torch.exp(block.A_log), -torch.arange(1.0, 9.0).repeat(64, 1))
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    torch.testing.assert_close(block.D, torch.ones(64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_block_matches_reference_in_float64(backend):
    """A float64 block computes in float64 throughout, A, D and the step size bias included: it agrees
    with the reference to 1e-12, in inference and in training (the chunked scan). (Measured: 1e-16;
    A_log alone rounded to float32 moves the output by 3e-11, D or the step size bias by 1e-10 to 1e-8.)"""
    block = make_block(backend)
    hidden = torch.randn(3, 19, 12, dtype=torch.float64)
    expected = reference_forward(block, hidden)
    with torch.no_grad():
        torch.testing.assert_close(block(hidden), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(block(hidden.requires_grad_()), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_reference(backend):
    block = make_block(backend)
    assert_gradients_match(block, reference_forward, torch.randn(2, 11, 12, dtype=torch.float64), atol=1e-10)


def test_causal_and_padding_mask():
    torch.manual_seed(0)
    block = MambaBlock(d_model=8, d_state=4).double()
    hidden = torch.randn(2, 15, 8, dtype=torch.float64)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 9:] = False
    out = block(hidden, mask)
    changed = hidden.clone()
    changed[0, 9:] = torch.randn(6, 8, dtype=torch.float64)  # only padding of row 0 changes
    torch.testing.assert_close(block(changed, mask), out, rtol=0, atol=0)
    changed[1, 10:] += 1.0  # a real future item of row 1: earlier outputs stay
    torch.testing.assert_close(block(changed, mask)[1, :10], out[1, :10], rtol=0, atol=0)


def test_state_dict_moves_between_instances():
    source, target = MambaBlock(16, d_state=8), MambaBlock(16, d_state=8, backend="torch")
    target.load_state_dict(source.state_dict())
    hidden = torch.randn(2, 7, 16)
    torch.testing.assert_close(target(hidden), source(hidden))
