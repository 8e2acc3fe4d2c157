"""A block called with ``positions`` gives its output at those positions only, as the whole output
indexed there would, with the same gradients; a causal block's state is unchanged by it."""
import pytest
import torch

from recbole_ssm.modules.hydra import HydraBlock
from recbole_ssm.modules.mamba import MambaBlock
from recbole_ssm.modules.mamba2 import Mamba2Block
from tests.conftest import CPU_BACKENDS

BLOCKS = {
    "mamba": lambda backend: MambaBlock(12, d_state=5, d_conv=4, expand=2, bias=True, backend=backend),
    "mamba2": lambda backend: Mamba2Block(12, d_state=5, d_conv=4, expand=2, headdim=6, chunk_size=4,
                                          backend=backend),
    "hydra": lambda backend: HydraBlock(12, d_state=5, d_conv=3, expand=2, headdim=6, chunk_size=4,
                                        backend=backend),
}
LENGTHS = torch.tensor([9, 4, 1, 7])


def block_and_inputs(name, backend):
    torch.manual_seed(0)
    block = BLOCKS[name](backend).double()
    with torch.no_grad():  # weights away from the initialisation, so that every part matters
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    hidden = torch.randn(len(LENGTHS), 9, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(9) < LENGTHS.unsqueeze(1)
    return block, hidden, mask


def outputs_and_gradients(block, hidden, mask, positions):
    """The block's output at each row's last real item, with and without ``positions``, and the
    gradients of a weighted sum of each wrt the input and every parameter."""
    rows = torch.arange(len(positions))
    results = []
    for out in (block(hidden, mask)[rows, positions], block(hidden, mask, positions=positions)):
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        inputs = [hidden, *block.parameters()]
        results.append((out, torch.autograd.grad((out * weights).sum(), inputs)))
    return results


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", BLOCKS)
def test_output_at_positions_equals_the_whole_output_there(name, backend):
    block, hidden, mask = block_and_inputs(name, backend)
    (whole, whole_grads), (at, at_grads) = outputs_and_gradients(block, hidden, mask, LENGTHS - 1)
    assert at.shape == (len(LENGTHS), 12)
    torch.testing.assert_close(at, whole, rtol=0, atol=1e-12)
    names = ["input"] + [n for n, _ in block.named_parameters()]
    for parameter_name, expected, got in zip(names, whole_grads, at_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-11, msg=parameter_name)
    assert whole_grads[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_state_is_unchanged_by_positions(name):
    block, hidden, mask = block_and_inputs(name, "auto")
    with torch.no_grad():
        whole, state = block(hidden, mask, return_state=True)
        at, state_at = block(hidden, mask, return_state=True, positions=LENGTHS - 1)
    torch.testing.assert_close(at, whole[torch.arange(len(LENGTHS)), LENGTHS - 1], rtol=0, atol=1e-12)
    for key in state:
        torch.testing.assert_close(state_at[key], state[key], rtol=0, atol=0)
