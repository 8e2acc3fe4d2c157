"""The compiled function of :mod:`recbole_ssm.ops.ssd_mixer`: the kernels of the convolution, the SSD
scans and the gated RMSNorm called in turn, its team callback, and its wrapper."""
import numpy as np
import torch
from numba import carray, njit

from recbole_ssm.ops.compiled import (JIT_OPTIONS, TEAM_HEADER, TEAM_SLOT, as_array, empty,
                                      run_team, share, team_array, team_float, team_floats, team_member,
                                      team_scalar, team_shape, wait)
from recbole_ssm.ops.conv.fused import _forward as convolve_rows
from recbole_ssm.ops.conv.shifted import padding
from recbole_ssm.ops.gated_rmsnorm.fused import _forward as normalise_rows
from recbole_ssm.ops.ssd.fused_recurrent import _forward as scan_rows, skip_term


@njit(**JIT_OPTIONS)
def _mix(xBC, taps, conv_bias, before, dt, A, D, fc_D, mask, z, norm_weight, eps, group_size, norm_before_gate,
         shift, positions, conv_out, x, B, C, dt_scan, skip, y, y_reverse, out, part, parts, barrier):
    """Part ``part`` of ``parts`` (see :func:`recbole_ssm.ops.compiled.run_team`): with at least as many
    rows as parts, whole rows, which need no barrier; with fewer, every row in three phases, shared
    out by positions (the convolution), heads or directions (the scans) and rows of y (the norm),
    with a barrier between phases.

    xBC (batch, length, d_inner + directions * 2 * g * n): the convolution's input, [x, (B, C) per
    direction]; taps (width, channels), conv_bias (channels,); dt (batch, length, directions, heads),
    softplus applied; A (heads,); D (heads,); fc_D (heads, d_inner) for Hydra's diagonal D + fc_D x_t,
    or (0, 0); mask (batch, length) bool or (0, 0); z (batch * length, d_inner), or (batch, d_inner) at
    ``positions`` (batch,) (size 0: all positions); out: like z. One direction: a forward scan; two:
    forward and reversed. ``shift``: outputs moved one position on in scan order (Hydra). At
    ``positions``, the scans stop where those positions are reached.
    Work arrays: conv_out like xBC; x (batch, length, heads, p); y like x, or (batch, 1, heads, p) at
    ``positions``; B, C (directions, batch, length, g, n); dt_scan (directions, batch, length, heads);
    skip (batch or 1, length or 1, heads, 1); y_reverse like y (two directions) or of size 0.
    """
    batch, length, heads, headdim = x.shape
    directions, d_inner = dt.shape[2], heads * headdim
    bc = B.shape[3] * B.shape[4]
    whole_rows = batch >= parts
    b0, b1 = share(batch, part, parts) if whole_rows else (0, batch)
    t0, t1 = (0, length) if whole_rows else share(length, part, parts)
    convolve_rows(xBC, taps, conv_bias, before, True, conv_out, b0, b1, t0, t1)
    # The convolution's output split into the scans' x, B, C and dt, by element loops over rows of
    # arrays reshaped once: slice assignments between views reshaped per position took 1.1x as
    # long in all (Hydra, one user, L = 200).
    x_rows = x.reshape(batch * length, d_inner)
    B_rows, C_rows = B.reshape(directions, batch * length, bc), C.reshape(directions, batch * length, bc)
    for b in range(b0, b1):
        for t in range(t0, t1):
            row, x_t = conv_out[b, t], x_rows[b * length + t]
            for c in range(d_inner):
                x_t[c] = row[c]
            for i in range(directions):
                start = d_inner + 2 * i * bc
                B_t, C_t = B_rows[i, b * length + t], C_rows[i, b * length + t]
                for c in range(bc):
                    B_t[c] = row[start + c]
                    C_t[c] = row[start + bc + c]
                for h in range(heads):
                    dt_scan[i, b, t, h] = dt[b, t, i, h]
            for h in range(fc_D.shape[0] if not positions.shape[0] or t == positions[b] else 0):
                diagonal = D[h]
                for c in range(d_inner):
                    diagonal += fc_D[h, c] * x_t[c]
                skip[b, t, h, 0] = diagonal
    wait(barrier)
    no_states = np.empty((0, 0, 0, 0), x.dtype)
    # Two directions over every position on two threads: a direction per thread, into a y each
    # (summed below), rather than half the heads each way: a scan's per-position work (B, C, the
    # decays; about 0.19 us of a position's 0.55 us at 8 heads of 16, d_state 32) then runs once per
    # direction, not twice. Hydra4Rec, one user, L = 200, two threads: its call 0.91-0.96 -> 0.89 ms.
    # At ``positions`` the reversed scan has little to do (only the positions after each row's), so
    # the heads are shared out there.
    by_direction = not whole_rows and parts == directions == 2 and not positions.shape[0]
    if by_direction:
        target = y if part == 0 else y_reverse
        target[:] = 0
        scan_rows(x, dt_scan[part], A, B[part], C[part], skip, part == 0, mask, no_states, no_states, target, 0,
                  batch, 0, heads, part == 1, shift, positions)
    else:
        h0, h1 = (0, heads) if whole_rows else share(heads, part, parts)
        for b in range(b0, b1):
            y[b, :, h0:h1] = 0
        for i in range(directions):
            scan_rows(x, dt_scan[i], A, B[i], C[i], skip, i == 0, mask, no_states, no_states, y, b0, b1, h0, h1,
                      i == 1, shift, positions)
    wait(barrier)
    rows = y.shape[1]           # per batch row: length, or 1 at positions
    r0, r1 = (b0 * rows, b1 * rows) if whole_rows else share(batch * rows, part, parts)
    y_rows = y.reshape(batch * rows, d_inner)
    if by_direction:
        reverse_rows = y_reverse.reshape(batch * rows, d_inner)
        for r in range(r0, r1):
            y_r, reverse_r = y_rows[r], reverse_rows[r]
            for c in range(d_inner):
                y_r[c] += reverse_r[c]
    normalise_rows(y_rows, z, norm_weight, eps, group_size, norm_before_gate, out, r0, r1)


def _mix_in_team(data):
    """:func:`_mix` on float32 arrays, its arguments unpacked, in its order, from the team's packed
    array (a team callback)."""
    packed = carray(data, (TEAM_HEADER + TEAM_SLOT * 25,))

    def floats(i, ndim):
        return team_floats(packed, i).reshape(team_shape(packed, i)[:ndim])

    part, parts, barrier = team_member(packed)
    xBC, taps, conv_bias, before = floats(0, 3), floats(1, 2), team_floats(packed, 2), team_scalar(packed, 3)
    dt, A, D, fc_D = floats(4, 4), team_floats(packed, 5), team_floats(packed, 6), floats(7, 2)
    mask = team_array(packed, 8, np.uint8).view(np.bool_).reshape(team_shape(packed, 8)[:2])
    z, norm_weight = floats(9, 2), team_floats(packed, 10)
    eps, group_size, norm_before_gate = team_float(packed, 11), team_scalar(packed, 12), team_scalar(packed, 13) != 0
    shift, positions = team_scalar(packed, 14) != 0, team_array(packed, 15, np.int64)
    conv_out, x, B, C = floats(16, 3), floats(17, 4), floats(18, 5), floats(19, 5)
    dt_scan, skip = floats(20, 4), floats(21, 4)
    y, y_reverse, out = floats(22, 4), floats(23, 4), floats(24, 2)
    _mix(xBC, taps, conv_bias, before, dt, A, D, fc_D, mask, z, norm_weight, eps, group_size, norm_before_gate, shift,
         positions, conv_out, x, B, C, dt_scan, skip, y, y_reverse, out, part, parts, barrier)


def ssd_mixer_fused(xBC, dt, z, conv_weight, conv_bias, causal, A, D, fc_D_weight, norm_weight, eps, group_size,
                    norm_before_gate, headdim, d_state, ngroups, mask=None, positions=None):
    """See :func:`recbole_ssm.ops.ssd_mixer.ssd_mixer_no_grad`."""
    dtype = torch.promote_types(xBC.dtype, torch.float32)
    batch, length, channels = xBC.shape
    directions, heads = dt.shape[2], dt.shape[3]
    d_inner, width = heads * headdim, conv_weight.shape[-1]

    def array(tensor):
        return as_array(tensor, dtype).numpy()

    xBC_np = array(xBC)
    np_dtype = xBC_np.dtype
    inputs = (xBC_np, array(conv_weight.reshape(channels, width).t()),
              np.zeros(channels, np_dtype) if conv_bias is None else array(conv_bias), padding(width, causal)[0],
              array(dt), array(A), array(D), np.empty((0, 0), np_dtype) if fc_D_weight is None else array(fc_D_weight),
              np.empty((0, 0), np.bool_) if mask is None else mask.contiguous().numpy(),
              array(z.reshape(-1, d_inner)), array(norm_weight), float(eps), int(group_size), bool(norm_before_gate),
              directions == 2, np.empty(0, np.int64) if positions is None else positions.contiguous().numpy())
    scan_shape = (directions, batch, length, ngroups, d_state)
    y_shape = (batch, 1 if positions is not None else length, heads, headdim)
    # Mamba-2's skip term is D; Hydra's, D + fc_D(x), is written by the kernel.
    skip = (skip_term(D, heads, dtype).numpy() if fc_D_weight is None
            else np.empty((batch, length, heads, 1), np_dtype))
    work = (np.empty((batch, length, channels), np_dtype), np.empty((batch, length, heads, headdim), np_dtype),
            np.empty(scan_shape, np_dtype), np.empty(scan_shape, np_dtype),
            np.empty((directions, batch, length, heads), np_dtype), skip, np.empty(y_shape, np_dtype),
            np.empty(y_shape if directions == 2 else (0, 0, 0, 0), np_dtype))
    out = empty(z.shape, dtype)
    out_np = out.numpy().reshape(-1, d_inner)
    run_team(_mix, _mix_in_team, inputs + work + (out_np,), batch)
    return out.to(xBC.dtype)
