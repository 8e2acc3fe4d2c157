"""Mamba2Block: mamba-ssm's parameters, a reference forward written out, chunking, causality, padding."""
import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.modules.mamba2 import Mamba2Block
from tests.ssd_reference import assert_gradients_match, perturbed, ssd_recurrence

D_MODEL, D_STATE, HEADDIM, NGROUPS, D_CONV = 8, 4, 4, 2, 4
D_INNER, NHEADS = 16, 4


def make_block(chunk_size=3):
    torch.manual_seed(0)
    return perturbed(Mamba2Block(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=2, headdim=HEADDIM,
                                 ngroups=NGROUPS, chunk_size=chunk_size, backend="torch"))


def reference_forward(block, u):
    """mamba-ssm's Mamba2 forward (non-fused path), with the scan done one step at a time."""
    z, xBC, dt = torch.split(block.in_proj(u), [D_INNER, D_INNER + 2 * NGROUPS * D_STATE, NHEADS], dim=-1)
    xBC = F.silu(block.conv1d(xBC.transpose(1, 2))[..., :u.shape[1]].transpose(1, 2))
    x, B, C = torch.split(xBC, [D_INNER, NGROUPS * D_STATE, NGROUPS * D_STATE], dim=-1)
    dt = F.softplus(dt + block.dt_bias)
    A = -torch.exp(block.A_log)
    b, l, _ = u.shape
    y, _ = ssd_recurrence(x.reshape(b, l, NHEADS, HEADDIM), dt, A, B.reshape(b, l, NGROUPS, D_STATE),
                          C.reshape(b, l, NGROUPS, D_STATE), D=block.D)
    y = y.reshape(b, l, D_INNER) * F.silu(z)
    y = y.reshape(b, l, NGROUPS, -1)
    y = (y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, l, D_INNER) * block.norm.weight
    return block.out_proj(y)


def test_parameters_are_mamba_ssm_s():
    block = Mamba2Block(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=2, headdim=HEADDIM, ngroups=NGROUPS)
    conv_dim = D_INNER + 2 * NGROUPS * D_STATE
    expected = {
        "in_proj.weight": (2 * D_INNER + 2 * NGROUPS * D_STATE + NHEADS, D_MODEL),
        "conv1d.weight": (conv_dim, 1, D_CONV),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (NHEADS,),
        "A_log": (NHEADS,),
        "D": (NHEADS,),
        "norm.weight": (D_INNER,),
        "out_proj.weight": (D_MODEL, D_INNER),
    }
    assert {n: tuple(p.shape) for n, p in block.named_parameters()} == expected
    assert block.conv1d.groups == conv_dim and block.conv1d.padding == (D_CONV - 1,)
    assert block.norm.group_size == D_INNER // NGROUPS and not block.norm.norm_before_gate
    # Initialisation as mamba-ssm: A in [1, 16], D = 1, softplus(dt_bias) in [1e-3, 1e-1], norm weight 1.
    A = torch.exp(block.A_log)
    assert ((A >= 1) & (A <= 16)).all() and (block.D == 1).all() and (block.norm.weight == 1).all()
    dt = F.softplus(block.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 1e-1 + 1e-7)).all()


@pytest.mark.parametrize("length", [1, 7])
def test_matches_reference_forward(length):
    block = make_block()
    u = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    y = block(u)
    assert y.shape == u.shape
    torch.testing.assert_close(y, reference_forward(block, u), rtol=0, atol=1e-10)


def test_gradients_match_reference():
    """The training path (chunked scans, chunks of 3 over 8 positions) differentiates as the reference."""
    assert_gradients_match(make_block(), reference_forward, torch.randn(2, 8, D_MODEL, dtype=torch.float64),
                           atol=1e-10)


def test_chunk_size_invariance():
    u = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    outputs = []
    for chunk_size in (1, 4, 9, 64):
        block = make_block(chunk_size)
        outputs.append(block(u))
    for y in outputs[1:]:
        torch.testing.assert_close(y, outputs[0], rtol=0, atol=1e-10)


def test_causal():
    block = make_block()
    u = torch.randn(1, 8, D_MODEL, dtype=torch.float64)
    u2 = u.clone()
    u2[:, 5:] = torch.randn(1, 3, D_MODEL, dtype=torch.float64)
    y, y2 = block(u), block(u2)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, 5:], y[:, 5:])


def test_mask():
    block = make_block()
    u = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y = block(u, mask=mask)
    torch.testing.assert_close(y[0], block(u[:1])[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(y[1, :4], block(u[1:, :4])[0], rtol=0, atol=1e-10)
    assert (y[1, 4:] == 0).all()


def test_headdim_must_divide_d_inner():
    with pytest.raises(ValueError, match=r"headdim \(5\) must divide expand \* d_model = 2 \* 8 = 16"):
        Mamba2Block(8, headdim=5)
