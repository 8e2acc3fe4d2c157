"""The layer shared by all our models: a sequence mixer, then a position-wise feed-forward.

As in Mamba4Rec (Liu et al. 2024, arXiv 2403.03900): mixer -> dropout -> LayerNorm, with a residual
connection only when layers are stacked, then the SASRec-style feed-forward network.
"""
import torch
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
    """mixer(x, mask) -> dropout -> (+ x if residual) -> LayerNorm -> FeedForward (4x inner size).

    With ``positions`` (batch,), the output at those positions only, (batch, d_model): everything
    after the mixer is position-wise, so it is computed there alone (a model that predicts from each
    user's last item needs nothing else from its last layer)."""

    def __init__(self, mixer, d_model, dropout, residual, eps=1e-12):
        super().__init__()
        self.mixer = mixer
        self.residual = residual
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, eps)

    def forward(self, x, mask=None, positions=None):                # (b, l, d_model), (b, l) bool, (b,)
        hidden = self.mixer(x, mask)
        if positions is not None:
            rows = torch.arange(len(positions), device=positions.device)
            hidden, x = hidden[rows, positions], x[rows, positions]  # (b, d_model)
        hidden = self.dropout(hidden)
        if self.residual:
            hidden = hidden + x
        return self.ffn(self.LayerNorm(hidden))
