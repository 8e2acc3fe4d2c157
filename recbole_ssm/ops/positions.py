"""Each row's entry at one position.

The models predict from each user's last real item, so their last layer needs everything after its
sequence scan (gates, norms, projections, the feed-forward network), which works position by
position, at that position alone; the compiled SSD scans stop at that position too.
"""
import torch


def at_positions(tensor, positions):
    """tensor (b, l, ...), positions (b,) int64 -> (b, ...): row i's entry at position positions[i]."""
    rows = torch.arange(len(positions), device=positions.device)
    return tensor[rows, positions]


def check_positions(positions, batch, length):
    """Raise ValueError unless ``positions`` is (batch,) of integers in [0, length)."""
    if positions.shape != (batch,) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be ({batch},) integers, one position per row; "
                         f"got {positions.dtype} of shape {tuple(positions.shape)}")
    if batch and bool(((positions < 0) | (positions >= length)).any()):
        raise ValueError(f"positions must be in [0, {length}) (the sequence length); "
                         f"got {positions.min().item()}..{positions.max().item()}")
