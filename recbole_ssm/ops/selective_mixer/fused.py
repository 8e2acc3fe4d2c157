"""The compiled functions of :mod:`recbole_ssm.ops.selective_mixer` and their wrapper: the convolution
(:mod:`recbole_ssm.ops.conv`'s kernel, called as that op calls it), x_proj in PyTorch, then one kernel
for dt_proj, softplus and the gated selective scan."""
import numpy as np
import torch
import torch.nn.functional as F
from numba import carray, njit

from recbole_ssm.ops.compiled import (JIT_OPTIONS, LOG2E, TEAM_HEADER, TEAM_SLOT, as_array, empty,
                                      exp32, run_team, share, softplus, team_array, team_floats, team_member,
                                      team_shape)
from recbole_ssm.ops.conv.fused import _convolve as convolve
from recbole_ssm.ops.conv.shifted import padding
from recbole_ssm.ops.selective_scan.fused_recurrent import _gate, _start_position, _update_states


@njit(inline="always", **JIT_OPTIONS)
def _projected_rates(low_t, weight_T, bias, out):
    """out[d] = softplus(bias[d] + sum_r low_t[r] weight_T[r, d]): dt_proj of x_proj's low-rank step
    sizes low_t (r,), weight_T (r, d), then softplus."""
    out[:] = bias
    for r in range(weight_T.shape[0]):
        low, weight = low_t[r], weight_T[r]
        for d in range(out.shape[0]):
            out[d] += low * weight[d]
    for d in range(out.shape[0]):
        out[d] = softplus(out[d])


@njit(**JIT_OPTIONS)
def _decay_rates_log2(A_log):
    """A log2 e = -exp(A_log) log2 e, transposed: (d, n) -> (n, d), as the scan's kernel takes it."""
    rates = np.empty_like(A_log)
    flat_in, flat_out = A_log.reshape(-1), rates.reshape(-1)
    log2e = A_log.dtype.type(LOG2E)
    for i in range(flat_in.shape[0]):
        flat_out[i] = -exp32(flat_in[i]) * log2e
    return np.ascontiguousarray(rates.T)


@njit(**JIT_OPTIONS)
def _scan_projected(x, projected, dt_weight, dt_bias, A_log, D, z, positions, out, part, parts, barrier):
    """From the convolution's output x (batch, length, d) and x_proj's output ``projected``
    (batch, length, r + 2n), [low-rank step sizes, B, C]: dt = softplus(dt_proj(low) + dt_bias),
    the selective scan from a zero state with A = -exp(A_log) (d, n) and the skip term D (d,), gated by
    silu(z). dt_weight (d, r). z, out: (batch, length, d), or (batch, 1, d) at ``positions``
    (batch,), where each row's scan stops (size 0: every position).
    Part ``part`` of ``parts`` (see :func:`recbole_ssm.ops.compiled.run_team`): whole rows, or with
    fewer rows than parts, a share of every row's channels (each scanned on its own; ``barrier`` is
    not needed)."""
    batch, length, d_inner = x.shape
    rank, n_state = dt_weight.shape[1], A_log.shape[1]
    b0, b1 = share(batch, part, parts) if batch >= parts else (0, batch)
    c0, c1 = (0, d_inner) if batch >= parts else share(d_inner, part, parts)
    # The share's parameters as arrays of their own: loops over a sub-range of a row's channels
    # vectorise worse than loops over whole (contiguous) arrays.
    weight_T = np.ascontiguousarray(dt_weight[c0:c1].T)     # (r, width)
    A_log2 = _decay_rates_log2(np.ascontiguousarray(A_log[c0:c1]))  # (n, width)
    bias, skip = dt_bias[c0:c1], D[c0:c1]
    h = np.empty((n_state, c1 - c0), x.dtype)
    dt = np.empty(c1 - c0, x.dtype)
    drive = np.empty(c1 - c0, x.dtype)
    y = np.empty(c1 - c0, x.dtype)
    for b in range(b0, b1):
        h[:] = 0
        stop = positions[b] + 1 if positions.shape[0] else length
        for t in range(stop):
            p_t = projected[b, t]
            _projected_rates(p_t[:rank], weight_T, bias, dt)
            _start_position(x[b, t, c0:c1], dt, skip, drive, y)
            _update_states(h, A_log2, dt, drive, p_t[rank:rank + n_state], p_t[rank + n_state:], y)
            if not positions.shape[0]:
                _gate(y, z[b, t, c0:c1], out[b, t, c0:c1])
        if positions.shape[0]:
            _gate(y, z[b, 0, c0:c1], out[b, 0, c0:c1])


def _scan_projected_in_team(data):
    """:func:`_scan_projected` on float32 arrays, its arguments unpacked from the team's packed array
    (a team callback)."""
    packed = carray(data, (TEAM_HEADER + TEAM_SLOT * 9,))
    part, parts, barrier = team_member(packed)
    x, projected, dt_weight, dt_bias, A_log, D, z, positions, out = (
        team_floats(packed, 0).reshape(team_shape(packed, 0)[:3]),
        team_floats(packed, 1).reshape(team_shape(packed, 1)[:3]),
        team_floats(packed, 2).reshape(team_shape(packed, 2)[:2]), team_floats(packed, 3),
        team_floats(packed, 4).reshape(team_shape(packed, 4)[:2]), team_floats(packed, 5),
        team_floats(packed, 6).reshape(team_shape(packed, 6)[:3]), team_array(packed, 7, np.int64),
        team_floats(packed, 8).reshape(team_shape(packed, 8)[:3]))
    _scan_projected(x, projected, dt_weight, dt_bias, A_log, D, z, positions, out, part, parts, barrier)


def selective_mixer_fused(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                          positions=None):
    """See :func:`recbole_ssm.ops.selective_mixer.selective_mixer_no_grad`."""
    dtype = torch.promote_types(x.dtype, torch.float32)

    def array(tensor):
        return as_array(tensor, dtype).numpy()

    convolved, _ = convolve(x, conv_weight, conv_bias, padding(conv_weight.shape[-1], True)[0], True)  # (b, l, d)
    projected = F.linear(convolved, x_proj_weight.detach().to(dtype)).numpy()              # (b, l, r + 2n)
    z_np = array(z.transpose(1, 2) if positions is None else z.unsqueeze(1))      # (b, l or 1, d)
    inputs = (convolved.numpy(), projected, array(dt_proj_weight), array(dt_proj_bias), array(A_log), array(D), z_np,
              np.empty(0, np.int64) if positions is None else positions.contiguous().numpy())
    out = empty(z_np.shape, dtype)
    out_np = out.numpy()
    run_team(_scan_projected, _scan_projected_in_team, inputs + (out_np,), x.shape[0])
    return (out if positions is None else out[:, 0]).to(x.dtype)
