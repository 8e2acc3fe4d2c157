"""The SSD blocks' compiled path without gradients (recbole_ssm.ops.ssd_mixer: convolution, scans and
gated norm in one compiled call) against each block's reference forward written out (float64) and
against the ops called one by one (with gradients, and under the torch backend), with padding masks,
output positions, several groups and float32."""
import pytest
import torch

from recbole_ssm.modules.hydra import HydraBlock
from recbole_ssm.modules.mamba2 import Mamba2Block
from recbole_ssm.ops.ssd_mixer import fused
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
