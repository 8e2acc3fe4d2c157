"""The Mamba-1 block's compiled path without gradients (recbole_ssm.ops.selective_mixer: convolution,
x_proj, dt_proj and the gated selective scan in two compiled calls) against the block's reference
forward written out step by step (float64) and against the ops called one by one (with gradients, and
under the torch backend), with padding masks, output positions, rows split between threads, odd state
sizes and float32."""
import pytest
import torch

from recbole_ssm.modules.mamba import MambaBlock
from recbole_ssm.ops import compiled
from recbole_ssm.ops.selective_mixer import fused
from tests.modules.test_mamba_block import SSM_PARAMETERS, reference_forward
from tests.no_grad_paths import assert_matches_ops_one_by_one, assert_taken_only_without_gradients
from tests.ssd_reference import perturbed

LENGTHS = torch.tensor([11, 5, 1, 8])


@pytest.fixture
def fused_calls(record_calls):
    """The calls of the compiled path (one entry per call)."""
    return record_calls(fused, "selective_mixer_fused")


def block_in(dtype, backend="auto", **settings):
    """A small block (d_state 5: one group of four states and one left over; dt_rank 1 at d_model 12)
    with its SSM parameters moved off their initial values."""
    torch.manual_seed(0)
    arguments = dict(d_state=5, d_conv=3, expand=2, backend=backend) | settings
    block = MambaBlock(12, **arguments)
    parameters = dict(block.named_parameters())
    return perturbed(block, [name for name in SSM_PARAMETERS if name in parameters]).to(dtype)


@pytest.mark.parametrize("settings", [{}, {"d_state": 8, "dt_rank": 3, "d_conv": 4}, {"conv_bias": False}])
@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_float64_matches_the_reference_forward(backend, settings, fused_calls):
    block = block_in(torch.float64, backend, **settings)
    u = torch.randn(3, 11, 12, dtype=torch.float64)
    with torch.no_grad():
        out = block(u)
        at_last = block(u, positions=torch.tensor([10, 4, 0]))
    expected = reference_forward(block, u)
    assert len(fused_calls) == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(at_last, expected[torch.arange(3), torch.tensor([10, 4, 0])], rtol=0, atol=1e-10)


@pytest.mark.parametrize("settings", [{}, {"bias": True}])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_equals_the_ops_one_by_one_with_padding_and_positions(dtype, tolerance, threads, settings, fused_calls):
    """Against the same block computing with gradients (the ops one by one, compiled) and under the
    torch backend: right-padded rows, at all positions and at each row's last real item, with the rows
    on one thread or split between two, and with the projections' biases (which the reference forward
    leaves out)."""
    block = block_in(dtype, **settings)
    u = torch.randn(len(LENGTHS), 11, 12, dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_ops_one_by_one(block, u, LENGTHS, tolerance)
    finally:
        torch.set_num_threads(previous)
    assert len(fused_calls) == 2


def test_a_position_inside_the_row_is_its_output_there(fused_calls):
    """The scan stops at each row's position: an output at an earlier position is that of the whole
    output there, and later inputs do not reach it."""
    block = block_in(torch.float64)
    u = torch.randn(2, 9, 12, dtype=torch.float64)
    positions = torch.tensor([3, 6])
    with torch.no_grad():
        whole = block(u)
        at = block(u, positions=positions)
        u[0, 4:] = torch.randn(5, 12, dtype=torch.float64)
        again = block(u, positions=positions)
    torch.testing.assert_close(at, whole[torch.arange(2), positions], rtol=0, atol=1e-12)
    torch.testing.assert_close(again, at, rtol=0, atol=0)
    assert len(fused_calls) == 3


def test_not_taken_where_gradients_are_needed_streaming_or_off_the_compiled_backend(fused_calls):
    block = block_in(torch.float32)
    u = torch.randn(2, 6, 12)
    assert_taken_only_without_gradients(block, u, fused_calls, other_calls=(
        lambda: block(u, return_state=True), lambda: block(u, state=block.empty_state(2))))


def test_bfloat16_block_computes_in_float32_and_returns_its_dtype(fused_calls):
    block = block_in(torch.bfloat16)
    u = torch.randn(2, 7, 12).to(torch.bfloat16)
    with torch.no_grad():
        out = block(u)
        block.backend = "torch"
        reference = block(u)
    assert out.dtype == torch.bfloat16 and len(fused_calls) == 1
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads,rows", [(2, 1), (3, 1), (3, 2), (2, 4)])
def test_on_the_openmp_team_equals_one_thread_and_the_ops_one_by_one(threads, rows, fused_calls, record_calls):
    """On torch's OpenMP team, one user or fewer rows than threads (each row's 24 channels shared out,
    12 or 8 per thread) or whole rows per thread: the result of one thread, and of the ops one by
    one, with padding, at all positions and at the last real item."""
    launches = record_calls(compiled, "_launch_team")
    block = block_in(torch.float32)
    u = torch.randn(rows, 11, 12)
    lengths = LENGTHS[:rows]
    mask = torch.arange(11) < lengths.unsqueeze(1)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one_thread = block(u, mask)
        torch.set_num_threads(threads)
        with torch.no_grad():
            team = block(u, mask)
        assert_matches_ops_one_by_one(block, u, lengths, 1e-5)
    finally:
        torch.set_num_threads(previous)
    assert len(launches) == 3 and len(fused_calls) == 4
    torch.testing.assert_close(team, one_thread, rtol=1e-6, atol=1e-6)
