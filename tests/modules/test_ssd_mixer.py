"""The SSD blocks' compiled path without gradients (recbole_ssm.ops.ssd_mixer: convolution, scans and
gated norm in one compiled call) against each block's reference forward written out (float64) and
against the ops called one by one (with gradients, and under the torch backend), with padding masks,
output positions, several groups and float32."""
import pytest
import torch

from recbole_ssm.modules.hydra import HydraBlock
from recbole_ssm.modules.mamba2 import Mamba2Block
from recbole_ssm.ops import compiled
from recbole_ssm.ops.ssd_mixer import fused, ssd_mixer_no_grad
from tests.modules import test_hydra_block, test_mamba2_block
from tests.no_grad_paths import assert_matches_ops_one_by_one, assert_taken_only_without_gradients
from tests.ssd_reference import perturbed

REFERENCES = {"mamba2": test_mamba2_block, "hydra": test_hydra_block}
BLOCKS = {"mamba2": Mamba2Block, "hydra": HydraBlock}
LENGTHS = torch.tensor([11, 5, 1])


@pytest.fixture
def fused_calls(record_calls):
    """The calls of the compiled path (one entry per call)."""
    return record_calls(fused, "ssd_mixer_fused")


def block_in(name, backend, dtype):
    """The reference tests' block (ngroups 2, 4 heads; Hydra's centred conv of width 5), perturbed."""
    reference = REFERENCES[name]
    torch.manual_seed(0)
    block = BLOCKS[name](reference.D_MODEL, d_state=reference.D_STATE, d_conv=reference.D_CONV, expand=2,
                         headdim=reference.HEADDIM, ngroups=reference.NGROUPS, chunk_size=3, backend=backend)
    return perturbed(block).to(dtype)


@pytest.mark.parametrize("backend", ["auto", "numba"])
@pytest.mark.parametrize("name", BLOCKS)
def test_float64_matches_the_reference_forward(name, backend, fused_calls):
    block = block_in(name, backend, torch.float64)
    u = torch.randn(3, 11, REFERENCES[name].D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        out = block(u)
        expected = REFERENCES[name].reference_forward(block, u)
    assert len(fused_calls) == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", BLOCKS)
def test_equals_the_ops_one_by_one_with_padding_and_positions(name, dtype, tolerance, fused_calls):
    """Against the same block computing with gradients (the ops one by one, compiled) and under the
    torch backend, right-padded rows, at all positions and at each row's last real item."""
    block = block_in(name, "auto", dtype)
    u = torch.randn(len(LENGTHS), 11, REFERENCES[name].D_MODEL, dtype=dtype)
    assert_matches_ops_one_by_one(block, u, LENGTHS, tolerance)
    assert len(fused_calls) == 2


def test_not_taken_where_gradients_are_needed_or_off_the_compiled_backend(fused_calls):
    block = block_in("hydra", "auto", torch.float32)
    assert_taken_only_without_gradients(block, torch.randn(2, 6, REFERENCES["hydra"].D_MODEL), fused_calls)


def mixer_inputs(batch, length=9, heads=3, headdim=4, d_state=5, ngroups=1, directions=2, width=5):
    """Random arguments of :func:`ssd_mixer_no_grad` for a small Hydra (two directions) or Mamba-2 (one)
    mixer in float32, padding in every row but the first, at all positions."""
    torch.manual_seed(1)
    d_inner = heads * headdim
    channels = d_inner + directions * 2 * ngroups * d_state
    mask = torch.rand(batch, length) > 0.3
    mask[0] = True
    return dict(xBC=torch.randn(batch, length, channels), dt=torch.rand(batch, length, directions, heads) * 0.5,
                z=torch.randn(batch, length, d_inner), conv_weight=torch.randn(channels, 1, width) * 0.4,
                conv_bias=torch.randn(channels), causal=directions == 1, A=-torch.rand(heads) - 0.1,
                D=torch.randn(heads), fc_D_weight=torch.randn(heads, d_inner) * 0.2 if directions == 2 else None,
                norm_weight=torch.randn(d_inner), eps=1e-5, group_size=d_inner, norm_before_gate=directions == 2,
                headdim=headdim, d_state=d_state, ngroups=ngroups, mask=mask)


@pytest.mark.parametrize("threads,rows", [(2, 1), (3, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("name", BLOCKS)
def test_on_the_openmp_team_equals_one_thread_and_the_ops_one_by_one(name, threads, rows, fused_calls,
                                                                     record_calls):
    """On torch's OpenMP team, one user or fewer rows than threads (each row's positions, heads and norm
    rows shared out: 3 heads on 2 or 3 threads, 1 to 11 positions per row) or whole rows per thread:
    the result of one thread, and of the ops one by one, with padding, at all positions and at the
    last real item."""
    launches = record_calls(compiled, "_launch_team")
    block = block_in(name, "auto", torch.float32)
    u = torch.randn(rows, 11, REFERENCES[name].D_MODEL)
    lengths = LENGTHS[:rows]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one_thread = block(u, torch.arange(11) < lengths.unsqueeze(1))
        torch.set_num_threads(threads)
        with torch.no_grad():
            team = block(u, torch.arange(11) < lengths.unsqueeze(1))
        assert_matches_ops_one_by_one(block, u, lengths, 1e-5)
    finally:
        torch.set_num_threads(previous)
    assert len(launches) == 3 and len(fused_calls) == 4
    torch.testing.assert_close(team, one_thread, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("length", [1, 2, 7])
@pytest.mark.parametrize("directions", [1, 2])
def test_team_shares_of_short_rows_and_odd_sizes(directions, length, threads):
    """Shares that are empty (a row of one or two positions on two or three threads) or uneven (4 heads
    in 2 groups on three threads); Hydra's two directions on two threads, one each."""
    inputs = mixer_inputs(batch=1, length=length, heads=4, ngroups=2, directions=directions)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = ssd_mixer_no_grad(**inputs)
        torch.set_num_threads(threads)
        team = ssd_mixer_no_grad(**inputs)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(team, one_thread, rtol=1e-6, atol=1e-6)
