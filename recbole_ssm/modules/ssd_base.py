"""What the Mamba-2 block (Dao & Gu 2024) and the Hydra block (Hwang et al. 2024) share.

Both project the input into [z, x, B, C, dt], convolve [x, B, C] depthwise along the sequence, run SSD
scans with a scalar decay A per head, normalise the result gated by z, and project it back. Hydra has
two directions: twice the B, C channels and twice the dt channels of Mamba-2.
Parameter names, shapes and initialisation follow mamba-ssm's ``Mamba2`` and goombalab/hydra's ``Hydra``.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_ssm.modules.arguments import check_positive_integers
from recbole_ssm.modules.norm import RMSNormGated
from recbole_ssm.ops.positions import at_positions
from recbole_ssm.ops.backend import check_backend
from recbole_ssm.ops.conv import depthwise_conv1d
from recbole_ssm.ops.ssd_mixer import ssd_mixer_no_grad

# Initial time steps, sampled log-uniformly in [DT_MIN, DT_MAX], floored at DT_INIT_FLOOR (as mamba-ssm).
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


def init_dt_bias(nheads):
    """dt_bias such that softplus(dt_bias) is a log-uniform sample of [DT_MIN, DT_MAX]: (nheads,)."""
    log_dt = torch.rand(nheads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
    dt = torch.exp(log_dt).clamp(min=DT_INIT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class SSDBlockBase(nn.Module):
    """Parameters and the projections around the scan; subclasses implement ``forward``.

    ``directions``: 1 (Mamba-2) or 2 (Hydra); ``causal``: causal (left-padded) convolution, else centred;
    ``A_init_range``: A = -exp(A_log) starts uniform in this range; ``norm_groups`` (the gated RMSNorm
    normalises d_inner / norm_groups features at a time) and ``norm_before_gate``: options of that norm.
    """

    def __init__(self, d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size, backend, *,
                 directions, causal, A_init_range, norm_groups, norm_before_gate):
        super().__init__()
        check_positive_integers(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                                headdim=headdim, ngroups=ngroups, chunk_size=chunk_size)
        d_inner = expand * d_model
        if d_inner % headdim != 0:
            raise ValueError(f"headdim ({headdim}) must divide expand * d_model = {expand} * {d_model} = {d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads, "
                             f"expand * d_model / headdim = {nheads}")
        if not causal and d_conv % 2 == 0:
            raise ValueError(f"a centred convolution needs an odd d_conv, got {d_conv}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.headdim, self.nheads, self.ngroups = d_inner, headdim, nheads, ngroups
        self.chunk_size, self.backend = chunk_size, check_backend(backend)
        self.directions, self.causal = directions, causal

        bc_dim = directions * 2 * ngroups * d_state  # [B, C] per direction
        conv_dim = d_inner + bc_dim
        # Order: [z, x, (B, C) per direction, dt per direction]
        self.in_proj = nn.Linear(d_model, d_inner + conv_dim + directions * nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=True,
                                padding=d_conv - 1 if causal else d_conv // 2)
        self.dt_bias = nn.Parameter(init_dt_bias(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(nheads))
        self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=d_inner // norm_groups, norm_before_gate=norm_before_gate,
                                 backend=backend)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def project(self, hidden_states, mask=None, positions=None):
        """Input projection, before the convolution.

        hidden_states: (b, l, d_model); mask: (b, l) bool or None (True = real position), zeroes the
        convolution's input at padded positions. Returns z (b, l, d_inner), or (b, d_inner) at
        ``positions`` (b,) only; xBC (b, l, d_inner + bc_dim), the convolution's input; dt (b, l,
        directions, nheads) after softplus(dt + dt_bias).
        """
        if mask is not None:
            # in_proj has no bias, so xBC is 0 at padded positions; z and dt there reach no real position
            # (the scans skip padded positions). d_model columns to mask instead of conv_dim.
            hidden_states = hidden_states.masked_fill(~mask.unsqueeze(-1), 0)
        # One product per part of in_proj, each a contiguous array (the compiled kernels' layout): no
        # copies of column slices, and no concatenation of the parts' gradients.
        z_weight, xBC_weight, dt_weight = self.in_proj.weight.split(
            [self.d_inner, self.conv1d.in_channels, self.directions * self.nheads])
        z = F.linear(hidden_states if positions is None else at_positions(hidden_states, positions), z_weight)
        xBC, dt = F.linear(hidden_states, xBC_weight), F.linear(hidden_states, dt_weight)
        dt = F.softplus(dt.unflatten(-1, (self.directions, self.nheads)) + self.dt_bias)
        return z, xBC, dt

    def convolve(self, xBC):
        """The depthwise convolution (causal or centred) and SiLU: (b, l, channels) -> (b, l, channels)."""
        return depthwise_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, causal=self.causal,
                                activation="silu", backend=self.backend).transpose(1, 2)

    def A(self):
        """The decay rates, -exp(A_log), in float32 at least: (nheads,)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def mix_without_gradients(self, z, xBC, dt, mask=None, positions=None):
        """Convolution, scans and gated norm in one compiled call, for CPU tensors under the compiled
        backend when no gradient is needed (see :func:`recbole_ssm.ops.backend.use_compiled_without_gradients`): the
        projections' outputs (as :meth:`project` returns them) -> out_proj's input, (b, l, d_inner), or
        (b, d_inner) at ``positions``. Hydra's diagonal uses its ``fc_D``."""
        fc_D = getattr(self, "fc_D", None)
        return ssd_mixer_no_grad(xBC, dt, z, self.conv1d.weight, self.conv1d.bias, self.causal, self.A(), self.D,
                                 None if fc_D is None else fc_D.weight, self.norm.weight, self.norm.eps,
                                 self.norm.group_size, self.norm.norm_before_gate, self.headdim, self.d_state,
                                 self.ngroups, mask, positions)

    def output(self, y, z, positions=None):
        """Gated norm and output projection: y (b, l, nheads, headdim), z (b, l, d_inner) -> (b, l, d_model);
        with ``positions`` (b,), at those positions only: z (b, d_inner) -> (b, d_model); y (b, nheads,
        headdim) and z (b, d_inner): y already at the positions of z."""
        y = y.flatten(-2)
        if positions is not None:
            y = at_positions(y, positions)
        return self.out_proj(self.norm(y, z))
