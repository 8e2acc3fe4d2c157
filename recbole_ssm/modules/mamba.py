"""The Mamba-1 block (Gu & Dao 2023, arXiv 2312.00752) with the parameters of ``mamba_ssm.Mamba``.

Parameter names and shapes match ``mamba_ssm.modules.mamba_simple.Mamba``, so a state dict moves
between this module and mamba-ssm's unchanged; the scan and the convolution run through
:mod:`recbole_ssm.ops`, which picks mamba-ssm's fused kernels or our pure-PyTorch path.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_ssm.modules.arguments import check_positive_integers
from recbole_ssm.ops.positions import at_positions
from recbole_ssm.modules.streaming import CausalStreaming, convolve_continuing, real_lengths
from recbole_ssm.ops.backend import check_backend, use_compiled_without_gradients
from recbole_ssm.ops.conv import depthwise_conv1d
from recbole_ssm.ops.selective_mixer import selective_mixer_no_grad
from recbole_ssm.ops.selective_scan import selective_scan


def inverse_softplus(x):
    """The y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


def at_least_float32(tensor):
    """``tensor`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def sample_time_steps(size, dt_min, dt_max, dt_floor):
    """Step sizes drawn log-uniformly in [dt_min, dt_max], clamped below at dt_floor (mamba-ssm's init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=dt_floor)


class MambaBlock(CausalStreaming, nn.Module):
    """Selective SSM block: in_proj -> causal conv -> selective scan (gated by z) -> out_proj.

    forward(hidden_states (batch, length, d_model), mask (batch, length) bool or None)
        -> (batch, length, d_model). The block is causal; ``mask`` (True on real items) zeroes
        padded inputs, which for right-padded sequences never reach a real position anyway.
    Its state (see :mod:`recbole_ssm.modules.streaming`): ``conv``, the last d_conv - 1 inputs of the
    convolution (batch, d_conv - 1, d_inner), and ``ssm`` (batch, d_state, d_inner): the SSM state
    transposed, as the compiled scan lays it out, so that steps pass it on without copies.
    A_log, D and the dt bias enter the scan in float32 at least, as mamba-ssm's kernel wants them;
    a float64 block computes everything in float64.
    """

    causal = True
    state_names = ("conv", "ssm")

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, conv_bias=True, bias=False, backend="auto"):
        super().__init__()
        check_positive_integers(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        if dt_rank != "auto":
            check_positive_integers(dt_rank=dt_rank)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.backend = check_backend(backend)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus(
                sample_time_steps(self.d_inner, dt_min, dt_max, dt_init_floor)))
        # S4D-real initialisation: A[d, n] = -(n + 1)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))                     # (d_inner, d_state)
        self.D = nn.Parameter(torch.ones(self.d_inner))             # (d_inner,)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def empty_state(self, batch_size):
        """The state before any position: zeros, on the block's device, the convolution inputs in its
        dtype and the SSM state in that dtype promoted to float32 at least (as the scan computes)."""
        weight = self.in_proj.weight
        return {
            "conv": weight.new_zeros(batch_size, self.d_conv - 1, self.d_inner),
            "ssm": weight.new_zeros(batch_size, self.d_state, self.d_inner,
                                    dtype=torch.promote_types(weight.dtype, torch.float32)),
        }

    def project_in(self, hidden_states, positions=None):
        """x (b, d_inner, l) and z, by in_proj's two halves: each a transposed view of its own (b, l, d_inner)
        array, the layout of the CPU kernels, which then need no copy of it (nor the backward pass a
        concatenation of the halves' gradients). With ``positions`` (b,), z only there: (b, d_inner)."""
        (x_weight, z_weight), (x_bias, z_bias) = self.in_proj.weight.chunk(2), (
            (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2))
        x = F.linear(hidden_states, x_weight, x_bias).transpose(1, 2)
        if positions is not None:
            return x, F.linear(at_positions(hidden_states, positions), z_weight, z_bias)
        return x, F.linear(hidden_states, z_weight, z_bias).transpose(1, 2)

    def forward(self, hidden_states, mask=None, state=None, return_state=False, positions=None):
        """With ``state`` (from :meth:`empty_state` or an earlier call) the sequence continues from it;
        with ``return_state`` the result is (output, state after each row's last real position), for
        right-padded rows. With ``positions`` (b,), the output at those positions only, (b, d_model):
        the z gate and out_proj run only there. Without gradients on the compiled backend, the middle
        of the block is :func:`recbole_ssm.ops.selective_mixer.selective_mixer_no_grad` (whose scans
        stop at the positions); otherwise the ops one by one, and the scan runs over every position."""
        streaming = state is not None or return_state
        if mask is not None:
            hidden_states = hidden_states * mask.unsqueeze(-1).to(hidden_states.dtype)
        x, z = self.project_in(hidden_states, positions)            # (b, d_inner, l); z alike or (b, d_inner)
        if not streaming and use_compiled_without_gradients(self.backend, x, self):
            return self.out_proj(selective_mixer_no_grad(
                x, z, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias, self.A_log, self.D, positions))
        if streaming:
            lengths = None if mask is None else real_lengths(mask)
            x, conv_state = convolve_continuing(x.transpose(1, 2), self.conv1d, self.backend,
                                                None if state is None else state["conv"], lengths)
            x = x.transpose(1, 2)
        else:
            x = depthwise_conv1d(x, self.conv1d.weight, self.conv1d.bias, causal=True,
                                 activation="silu", backend=self.backend)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)     # (b, l, r), (b, l, n), (b, l, n)
        # dt @ W^T with W^T made contiguous rather than F.linear(dt, W): autograd then computes W's
        # gradient as dt^T @ grad, (dt_rank, d_inner), not as grad^T @ dt, which with dt_rank = 4 rows
        # took 10x as long on a CPU (85 ms against 8 ms at batch 2048, length 50).
        dt = (dt @ self.dt_proj.weight.t().contiguous()).transpose(1, 2)  # (b, d_inner, l), bias in the scan
        A = -torch.exp(at_least_float32(self.A_log))                # (d_inner, d_state)
        B, C, D = B.transpose(1, 2), C.transpose(1, 2), at_least_float32(self.D)
        dt_bias = at_least_float32(self.dt_proj.bias)
        scan_gate = z if positions is None else None                # the gate inside the scan, or after it
        if streaming and mask is not None:
            # Padded positions convolve the real inputs before them, so their step sizes softplus(...)
            # are > 0 and would decay and drive the state; a step size of 0 leaves it as it is.
            dt = F.softplus(dt + dt_bias.unsqueeze(-1)).masked_fill(~mask.unsqueeze(1), 0)
            dt_bias = None
        out = selective_scan(x, dt, A, B, C, D, z=scan_gate, delta_bias=dt_bias,
                             delta_softplus=dt_bias is not None,
                             initial_state=None if state is None else state["ssm"].transpose(1, 2),
                             return_last_state=streaming, backend=self.backend)
        y, ssm_state = out if streaming else (out, None)            # (b, d_inner, l)
        y = y.transpose(1, 2)
        if positions is not None:
            y = at_positions(y, positions) * F.silu(z)              # (b, d_inner)
        out = self.out_proj(y)
        return (out, {"conv": conv_state, "ssm": ssm_state.transpose(1, 2)}) if streaming else out
