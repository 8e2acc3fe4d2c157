"""What the causal blocks (Mamba, Mamba-2) share to carry their state from one call to the next.

A causal block's state after position t is (1) the last ``d_conv - 1`` inputs of its depthwise
convolution, which the next positions' convolution windows still reach, (batch, d_conv - 1,
channels), and (2) its SSM state. A call
``block(hidden_states, mask, state=..., return_state=True)`` continues from ``state`` and returns the
state after each row's last real position, so one pass over a history gives its state and a call
with one position per row is a step.
"""
import torch
import torch.nn.functional as F

from recbole_ssm.ops.conv import depthwise_conv1d


def real_lengths(mask):
    """Real positions per row, (batch,) int64, of a right-padded ``mask`` (batch, length): True on a
    prefix of each row."""
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)):
        raise ValueError("a state is taken at each row's last real position, which needs right-padded "
                         "rows: the mask must be True on a prefix of each row and False after it")
    return lengths


def convolve_continuing(x, conv1d, backend, tail=None, lengths=None):
    """Causal depthwise convolution and SiLU of ``x`` (b, l, c), channels last, continuing a sequence
    whose last ``width - 1`` inputs were ``tail`` (b, width - 1, c) (None: a sequence start, zeros).

    Returns the outputs (b, l, c) and the new tail: the last ``width - 1`` inputs up to each row's
    position ``lengths - 1`` (``lengths`` (b,) int64; None: all ``l`` positions), reaching into ``tail``
    where a row has fewer new positions than that, (b, width - 1, c). Channels last, each of a
    window's inputs is one contiguous block.
    """
    batch, length, channels = x.shape
    keep = conv1d.weight.shape[-1] - 1
    before = x.new_zeros(batch, keep, channels) if tail is None else tail.to(x.dtype)
    inputs = torch.cat([before, x], dim=1)                              # (b, keep + l, c)
    if length == 1 and lengths is None:  # a step: one window, one dot product per channel
        out = (inputs * conv1d.weight.squeeze(1).t()).sum(1, keepdim=True)
        out = F.silu(out if conv1d.bias is None else out + conv1d.bias)
    else:
        out = depthwise_conv1d(inputs.transpose(1, 2), conv1d.weight, conv1d.bias, causal=True, activation="silu",
                               backend=backend)[..., keep:].transpose(1, 2)
    if lengths is None:
        new_tail = inputs[:, length:]
    else:  # input position p sits at p + keep: the tail is positions lengths - keep .. lengths - 1
        index = lengths.unsqueeze(1) + torch.arange(keep, device=x.device)   # (b, keep)
        new_tail = inputs.gather(1, index.unsqueeze(-1).expand(batch, keep, channels))
    return out, new_tail


class CausalStreaming:
    """Mixin of the causal blocks: ``step`` as a one-position call of the block's ``forward(...,
    state=..., return_state=True)``; the block defines ``forward`` that way, ``empty_state`` and
    ``state_names``."""

    def step(self, hidden_states, state):
        """Append one position per row: hidden_states (b, d_model) and the state after the previous
        positions -> (output (b, d_model), the state after this position)."""
        out, state = self(hidden_states.unsqueeze(1), state=state, return_state=True)
        return out.squeeze(1), state
