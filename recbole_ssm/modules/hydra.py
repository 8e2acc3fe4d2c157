"""The Hydra block: Hwang, Lahoti, Dao & Gu, "Hydra: Bidirectional State Space Models Through
Generalized Matrix Mixers", 2024.

Parameters, initialisation (A = 1) and forward math as the reference ``hydra.modules.hydra.Hydra``
(goombalab/hydra; defaults bias=False, conv_bias=True, no learnable initial states), so a state dict
loads into it unchanged.
"""
import torch.nn as nn
import torch.nn.functional as F

from recbole_ssm.modules.ssd_base import SSDBlockBase
from recbole_ssm.ops.backend import use_compiled_without_gradients
from recbole_ssm.ops.hydra import hydra_mixer


class HydraBlock(SSDBlockBase):
    """Hydra mixer: centred depthwise conv, quasiseparable mixer (a forward and a backward SSD scan and
    a data-dependent diagonal), gated RMSNorm; (b, l, d_model) -> (b, l, d_model). Bidirectional."""

    # Why it has no streaming state, for the error that streaming calls give.
    streaming_unsupported = (
        "Hydra is bidirectional: every position's output depends on the items after it too (its "
        "centred convolution and its backward scan look ahead), so a new item changes the "
        "representation of every earlier position and no fixed-size state can absorb it in one step. "
        "Recompute with forward() / full_sort_predict() on the whole history, or stream with "
        "Mamba4Rec or Mamba2Rec, which are causal."
    )

    def __init__(self, d_model, d_state=64, d_conv=7, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 backend="auto"):
        super().__init__(d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size, backend,
                         directions=2, causal=False, A_init_range=(1, 1),
                         norm_groups=1, norm_before_gate=True)
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False)

    def forward(self, hidden_states, mask=None, positions=None):
        """hidden_states: (b, l, d_model); mask: (b, l) bool or None, True = real item. Padded positions
        are invisible to the real ones (the convolution and both scans skip them) and get output 0, so
        outputs at real positions do not depend on the padding nor on the other rows.
        Returns (b, l, d_model), or (b, d_model) at ``positions`` (b,) only."""
        z, xBC, dt = self.project(hidden_states, mask, positions)
        if use_compiled_without_gradients(self.backend, xBC, self):
            return self.out_proj(self.mix_without_gradients(z, xBC, dt, mask, positions))
        xBC = self.convolve(xBC)
        gn = self.ngroups * self.d_state
        x, B_fwd, C_fwd, B_bwd, C_bwd = xBC.split([self.d_inner, gn, gn, gn, gn], dim=-1)
        diagonal = F.linear(x, self.fc_D.weight, self.D)  # (b, l, nheads): D + fc_D(x)
        B_fwd, C_fwd, B_bwd, C_bwd = (
            t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B_fwd, C_fwd, B_bwd, C_bwd)
        )
        y = hydra_mixer(x.unflatten(-1, (self.nheads, self.headdim)), dt[:, :, 0], dt[:, :, 1], self.A(),
                        B_fwd, C_fwd, B_bwd, C_bwd, diagonal, self.chunk_size, mask=mask, positions=positions,
                        backend=self.backend)  # (b, l, nheads, headdim), or (b, nheads, headdim) at positions
        return self.output(y, z)
