"""The Mamba-2 block: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", ICML 2024.

Parameters as mamba-ssm's ``mamba_ssm.modules.mamba2.Mamba2`` (defaults d_ssm=None, rmsnorm=True,
norm_before_gate=False, D_has_hdim=False, bias=False, conv_bias=True), so a state dict loads into it
unchanged.
"""
from recbole_ssm.modules.ssd_base import SSDBlockBase
from recbole_ssm.ops.ssd import ssd_scan


class Mamba2Block(SSDBlockBase):
    """Mamba-2 mixer: causal depthwise conv, SSD scan, gated RMSNorm; (b, l, d_model) -> (b, l, d_model).

    d_inner = expand * d_model, split into nheads = d_inner / headdim heads; B and C have ngroups
    groups of d_state. chunk_size only changes how the scan is computed, not its result.
    """

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 backend="auto"):
        super().__init__(d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size, backend,
                         directions=1, causal=True, A_init_range=(1, 16),
                         norm_groups=ngroups, norm_before_gate=False)

    def forward(self, hidden_states, mask=None):
        """hidden_states: (b, l, d_model); mask: (b, l) bool or None, True = real item (padding makes no
        state change and gets output 0). Returns (b, l, d_model); output t depends on inputs up to t."""
        z, xBC, dt = self.project(hidden_states, mask)
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        B, C = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B, C))
        y = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt[:, :, 0], self.A(), B, C, self.chunk_size,
                     D=self.D, mask=mask, backend=self.backend)  # (b, l, nheads, headdim)
        return self.output(y, z)
