"""HydraBlock: the reference Hydra's parameters, its forward written out, chunking, padding invariance."""
import pytest
import torch
import torch.nn.functional as F

from recbole_ssm.modules.hydra import HydraBlock
from tests.ssd_reference import assert_gradients_match, perturbed, ssd_recurrence

D_MODEL, D_STATE, HEADDIM, NGROUPS, D_CONV = 8, 4, 4, 2, 5
D_INNER, NHEADS = 16, 4


def make_block(chunk_size=3):
    torch.manual_seed(0)
    return perturbed(HydraBlock(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=2, headdim=HEADDIM,
                                ngroups=NGROUPS, chunk_size=chunk_size, backend="torch"))


def reference_forward(block, u):
    """goombalab/hydra's Hydra.forward (use_mem_eff_path=False), with the scan done one step at a time."""
    b, l, _ = u.shape
    gn = NGROUPS * D_STATE
    z, xBC, dt = torch.split(block.in_proj(u), [D_INNER, D_INNER + 4 * gn, 2 * NHEADS], dim=-1)
    dt = torch.cat((dt[:, :, :NHEADS], torch.flip(dt[:, :, NHEADS:], (1,))), dim=0)
    dt = F.softplus(dt + block.dt_bias)
    xBC = F.silu(block.conv1d(xBC.transpose(1, 2)).transpose(1, 2))
    x, BC = torch.split(xBC, [D_INNER, 4 * gn], dim=-1)
    x_og = x
    x = torch.cat((x, torch.flip(x, (1,))), dim=0)
    BC = torch.cat((BC[:, :, :2 * gn], torch.flip(BC[:, :, 2 * gn:], (1,))), dim=0)
    B, C = torch.split(BC, [gn, gn], dim=-1)
    y, _ = ssd_recurrence(x.reshape(2 * b, l, NHEADS, HEADDIM), dt, -torch.exp(block.A_log),
                          B.reshape(2 * b, l, NGROUPS, D_STATE), C.reshape(2 * b, l, NGROUPS, D_STATE))
    y = y.reshape(2 * b, l, D_INNER)
    y = torch.roll(y, shifts=1, dims=1)
    y[:, 0, :] = 0.0
    y_fw, y_bw = y[:b], torch.flip(y[b:], (1,))
    diag = F.linear(x_og, block.fc_D.weight, bias=block.D).repeat_interleave(HEADDIM, dim=-1)
    y = y_fw + y_bw + x_og * diag
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * block.norm.weight * F.silu(z)
    return block.out_proj(y)


def test_parameters_are_the_reference_s():
    block = HydraBlock(D_MODEL, d_state=D_STATE, d_conv=D_CONV, expand=2, headdim=HEADDIM, ngroups=NGROUPS)
    conv_dim = D_INNER + 4 * NGROUPS * D_STATE
    expected = {
        "in_proj.weight": (2 * D_INNER + 4 * NGROUPS * D_STATE + 2 * NHEADS, D_MODEL),
        "conv1d.weight": (conv_dim, 1, D_CONV),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (NHEADS,),
        "A_log": (NHEADS,),
        "D": (NHEADS,),
        "fc_D.weight": (NHEADS, D_INNER),
        "norm.weight": (D_INNER,),
        "out_proj.weight": (D_MODEL, D_INNER),
    }
    assert {n: tuple(p.shape) for n, p in block.named_parameters()} == expected
    assert block.conv1d.groups == conv_dim and block.conv1d.padding == (D_CONV // 2,)
    assert block.norm.group_size == D_INNER and block.norm.norm_before_gate
    # Initialisation as the reference: A = 1, D = 1, softplus(dt_bias) in [1e-3, 1e-1].
    assert (block.A_log == 0).all() and (block.D == 1).all()
    dt = F.softplus(block.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 1e-1 + 1e-7)).all()


@pytest.mark.parametrize("length", [1, 2, 8])
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
    outputs = [make_block(chunk_size)(u) for chunk_size in (1, 4, 9, 64)]
    for y in outputs[1:]:
        torch.testing.assert_close(y, outputs[0], rtol=0, atol=1e-10)


def test_bidirectional():
    block = make_block()
    u = torch.randn(1, 8, D_MODEL, dtype=torch.float64)
    u2 = u.clone()
    u2[:, 6] += 1
    y, y2 = block(u), block(u2)
    assert not torch.allclose(y2[:, 0], y[:, 0])  # beyond the convolution's reach, through the backward scan


def test_padding_invariance():
    """A user's outputs at real positions are the same with 0, 3 or 10 junk padded positions after them,
    and when batched with a longer sequence."""
    block = make_block()
    real = torch.randn(1, 5, D_MODEL, dtype=torch.float64)
    y_alone = block(real)
    for pad in (0, 3, 10):
        u = torch.cat([real, torch.randn(1, pad, D_MODEL, dtype=torch.float64) * 5], dim=1)
        mask = torch.arange(5 + pad).unsqueeze(0) < 5
        y = block(u, mask=mask)
        torch.testing.assert_close(y[:, :5], y_alone, rtol=0, atol=1e-10)
        assert (y[:, 5:] == 0).all()
    other = torch.randn(1, 11, D_MODEL, dtype=torch.float64)
    u = torch.cat([torch.cat([real, torch.randn(1, 6, D_MODEL, dtype=torch.float64)], dim=1), other])
    mask = torch.tensor([[True] * 5 + [False] * 6, [True] * 11])
    y = block(u, mask=mask)
    torch.testing.assert_close(y[:1, :5], y_alone, rtol=0, atol=1e-10)
    torch.testing.assert_close(y[1:], block(other), rtol=0, atol=1e-10)


def test_errors():
    with pytest.raises(ValueError, match=r"headdim \(6\) must divide expand \* d_model = 2 \* 8 = 16"):
        HydraBlock(8, headdim=6)
    with pytest.raises(ValueError, match="odd d_conv"):
        HydraBlock(8, headdim=4, d_conv=4)
