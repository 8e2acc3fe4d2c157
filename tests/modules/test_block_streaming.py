"""The causal blocks' states: continuing a sequence from a state, in chunks or one position at a time,
gives the outputs of one pass over the whole sequence; a state taken at a right-padded row's end
ignores the padding."""
import pytest
import torch

from recbole_ssm.modules.mamba import MambaBlock
from recbole_ssm.modules.mamba2 import Mamba2Block

BLOCKS = {
    "mamba": lambda: MambaBlock(12, d_state=5, d_conv=4, expand=2),
    "mamba2": lambda: Mamba2Block(12, d_state=5, d_conv=4, expand=2, headdim=6, chunk_size=4),
}


def block_and_inputs(name, length=17, batch=3):
    torch.manual_seed(0)
    block = BLOCKS[name]().double()
    with torch.no_grad():  # weights well away from the initialisation, so that states matter
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return block, torch.randn(batch, length, 12, dtype=torch.float64)


@pytest.mark.parametrize("name", BLOCKS)
def test_continuing_from_states_equals_one_pass(name):
    block, hidden = block_and_inputs(name)
    with torch.no_grad():
        whole, final = block(hidden, return_state=True)
        outputs, state = [], block.empty_state(len(hidden))
        for start, stop in ((0, 2), (2, 9)):  # chunks: shorter, then longer than the convolution
            out, state = block(hidden[:, start:stop], state=state, return_state=True)
            outputs.append(out)
        for position in range(9, hidden.shape[1]):  # then one position at a time
            out, state = block.step(hidden[:, position], state)
            outputs.append(out.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole, rtol=0, atol=1e-12)
    assert state.keys() == final.keys() == set(block.state_names)
    for key in final:
        torch.testing.assert_close(state[key], final[key], rtol=0, atol=1e-12)
    empty = block.empty_state(len(hidden))
    assert all(state[key].shape == empty[key].shape and state[key].dtype == empty[key].dtype for key in empty)


@pytest.mark.parametrize("name", BLOCKS)
def test_state_at_the_real_end_ignores_right_padding(name):
    block, hidden = block_and_inputs(name)
    lengths = torch.tensor([17, 6, 1])
    mask = torch.arange(17) < lengths.unsqueeze(1)
    with torch.no_grad():
        _, padded = block(hidden, mask, return_state=True)
        for row, length in enumerate(lengths.tolist()):
            _, alone = block(hidden[row:row + 1, :length], return_state=True)
            for key in alone:
                torch.testing.assert_close(padded[key][row:row + 1], alone[key], rtol=0, atol=1e-12)
        # Not vacuous: the state at the end of the padded row, padding included, is another one.
        _, through_padding = block(hidden[1:2] * mask[1:2].unsqueeze(-1), return_state=True)
    assert (through_padding["ssm"] - padded["ssm"][1:2]).abs().max() > 1e-3


@pytest.mark.parametrize("name", BLOCKS)
def test_state_needs_right_padded_rows(name):
    block, hidden = block_and_inputs(name)
    left_padded = torch.arange(17) >= torch.tensor([[0], [5], [9]])
    with pytest.raises(ValueError, match="right-padded"):
        block(hidden, left_padded, return_state=True)
