"""The layer shared by all our models: a sequence mixer, then a position-wise feed-forward.

As in Mamba4Rec (Liu et al. 2024, arXiv 2403.03900): mixer -> dropout -> LayerNorm, with a residual
connection only when layers are stacked, then the SASRec-style feed-forward network.
"""
import torch.nn as nn


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
    """mixer(x, mask) -> dropout -> (+ x if residual) -> LayerNorm -> FeedForward (4x inner size)."""

    def __init__(self, mixer, d_model, dropout, residual, eps=1e-12):
        super().__init__()
        self.mixer = mixer
        self.residual = residual
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, eps)

    def forward(self, x, mask=None, return_state=False):            # (b, l, d_model), (b, l) bool
        """With ``return_state`` (causal mixers, see :mod:`recbole_ssm.modules.streaming`), (output, the
        mixer's state after each row's last real position)."""
        if not return_state:
            return self.after_mixer(self.mixer(x, mask), x)
        mixed, state = self.mixer(x, mask, return_state=True)
        return self.after_mixer(mixed, x), state

    def step(self, x, state):
        """One new position per row through a causal mixer: x (b, d_model) -> (output, new state)."""
        mixed, state = self.mixer.step(x, state)
        return self.after_mixer(mixed, x), state

    def after_mixer(self, mixed, x):
        """Dropout, residual, LayerNorm and feed-forward after the mixer; ``x`` is the mixer's input."""
        hidden = self.dropout(mixed)
        if self.residual:
            hidden = hidden + x
        return self.ffn(self.LayerNorm(hidden))
