"""The layer shared by all our models: a sequence mixer, then a position-wise feed-forward.

As in Mamba4Rec (Liu et al. 2024, arXiv 2403.03900): mixer -> dropout -> LayerNorm, with a residual
connection only when layers are stacked, then the SASRec-style feed-forward network.
"""
import torch.nn as nn

from recbole_ssm.ops.positions import at_positions


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> dropout -> Linear -> dropout, residual, LayerNorm."""

    def __init__(self, d_model, inner_size, dropout, eps=1e-12):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x):                                           # (b, l, d_model)
        hidden = self.dropout(self.activation(self.w_1(x)))
        hidden = self.dropout(self.w_2(hidden))
        return self.LayerNorm(hidden + x)


class MixerLayer(nn.Module):
    """mixer(x, mask) -> dropout -> (+ x if residual) -> LayerNorm -> FeedForward (4x inner size).

    With ``positions`` (batch,), the output at those positions only, (batch, d_model): everything
    after the mixer's sequence scan is position-wise, so it is computed there alone (a model that
    predicts from each user's last item needs nothing else from its last layer)."""

    def __init__(self, mixer, d_model, dropout, residual, eps=1e-12):
        super().__init__()
        self.mixer = mixer
        self.residual = residual
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, eps)

    def forward(self, x, mask=None, positions=None, return_state=False):  # (b, l, d_model), (b, l) bool, (b,)
        """With ``return_state`` (causal mixers, see :mod:`recbole_ssm.modules.streaming`), (output, the
        mixer's state after each row's last real position, which ``mask`` then marks)."""
        if return_state:
            mixed, state = self.mixer(x, mask, positions=positions, return_state=True)
        else:
            mixed, state = self.mixer(x, mask, positions=positions), None
        if positions is not None:
            x = at_positions(x, positions)                          # (b, d_model)
        out = self.after_mixer(mixed, x)
        return (out, state) if return_state else out

    def step(self, x, state):
        """One new position per row through a causal mixer: x (b, d_model) -> (output, new state)."""
        mixed, state = self.mixer.step(x, state)
        return self.after_mixer(mixed, x), state

    def after_mixer(self, hidden, x):
        """Dropout, residual, LayerNorm and feed-forward of the mixer's output ``hidden``; ``x`` is the
        mixer's input (both at the same positions)."""
        hidden = self.dropout(hidden)
        if self.residual:
            hidden = hidden + x
        return self.ffn(self.LayerNorm(hidden))
