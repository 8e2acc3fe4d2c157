"""Each row's entry at one position.

The models predict from each user's last real item, so their last layer needs everything after its
sequence scan (gates, norms, projections, the feed-forward network), which works position by
position, at that position alone.
"""
import torch


def at_positions(tensor, positions):
    """tensor (b, l, ...), positions (b,) int64 -> (b, ...): row i's entry at position positions[i]."""
    rows = torch.arange(len(positions), device=positions.device)
    return tensor[rows, positions]
