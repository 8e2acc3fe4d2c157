"""The Mamba-2 block: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", ICML 2024.

Parameters as mamba-ssm's ``mamba_ssm.modules.mamba2.Mamba2`` (defaults d_ssm=None, rmsnorm=True,
norm_before_gate=False, D_has_hdim=False, bias=False, conv_bias=True), so a state dict loads into it
unchanged.
"""
import torch

from recbole_ssm.modules.ssd_base import SSDBlockBase
from recbole_ssm.modules.streaming import CausalStreaming, convolve_continuing, real_lengths
from recbole_ssm.ops.backend import use_compiled_without_gradients
from recbole_ssm.ops.ssd import ssd_scan


class Mamba2Block(CausalStreaming, SSDBlockBase):
    """Mamba-2 mixer: causal depthwise conv, SSD scan, gated RMSNorm; (b, l, d_model) -> (b, l, d_model).

    d_inner = expand * d_model, split into nheads = d_inner / headdim heads; B and C have ngroups
    groups of d_state. chunk_size only changes how the scan is computed, not its result.
    Its state (see :mod:`recbole_ssm.modules.streaming`): ``conv``, the last d_conv - 1 inputs of the
    convolution (batch, d_conv - 1, d_inner + 2 * ngroups * d_state), and ``ssm`` (batch, nheads,
    headdim, d_state).
    """

    state_names = ("conv", "ssm")

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 backend="auto"):
        super().__init__(d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size, backend,
                         directions=1, causal=True, A_init_range=(1, 16),
                         norm_groups=ngroups, norm_before_gate=False)

    def empty_state(self, batch_size):
        """The state before any position: zeros, on the block's device, the convolution inputs in its
        dtype and the SSM state in that dtype promoted to float32 at least (as the scan computes)."""
        weight = self.in_proj.weight
        return {
            "conv": weight.new_zeros(batch_size, self.d_conv - 1, self.conv1d.in_channels),
            "ssm": weight.new_zeros(batch_size, self.nheads, self.headdim, self.d_state,
                                    dtype=torch.promote_types(weight.dtype, torch.float32)),
        }

    def forward(self, hidden_states, mask=None, state=None, return_state=False, positions=None):
        """hidden_states: (b, l, d_model); mask: (b, l) bool or None, True = real item (padding makes no
        state change and gets output 0). Returns (b, l, d_model); output t depends on inputs up to t.
        With ``state`` (from :meth:`empty_state` or an earlier call) the sequence continues from it; with
        ``return_state`` the result is (output, state after each row's last real position), for
        right-padded rows. With ``positions`` (b,), the output at those positions only, (b, d_model)."""
        streaming = state is not None or return_state
        z, xBC, dt = self.project(hidden_states, mask, positions)
        if not streaming and use_compiled_without_gradients(self.backend, xBC, self):
            return self.out_proj(self.mix_without_gradients(z, xBC, dt, mask, positions))
        if streaming:
            lengths = None if mask is None else real_lengths(mask)
            xBC, conv_state = convolve_continuing(xBC, self.conv1d, self.backend,
                                                  None if state is None else state["conv"], lengths)
        else:
            xBC = self.convolve(xBC)
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        B, C = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B, C))
        out = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt[:, :, 0], self.A(), B, C, self.chunk_size,
                       D=self.D, initial_states=None if state is None else state["ssm"],
                       return_final_states=streaming, mask=mask, positions=None if streaming else positions,
                       backend=self.backend)
        if not streaming:
            return self.output(out, z)              # out: (b, l, nheads, headdim), or (b, nheads, headdim)
        y, ssm_state = out  # (b, l, nheads, headdim), (b, nheads, headdim, d_state)
        return self.output(y, z, positions), {"conv": conv_state, "ssm": ssm_state}
