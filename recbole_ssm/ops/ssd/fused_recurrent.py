"""The SSD scan as compiled CPU kernels (Numba): the recurrence position by position, forward and
backward, with initial and final states.

Each (batch row, head) is scanned with its (headdim, d_state) state in cache; per position that is
one scalar decay, a rank-one update and a matrix-vector read-out: O(length) work with no matrix
products and no padding to whole chunks, which beats the chunked matrix-product form wherever the
per-call overhead of PyTorch's many small operations dominates (see :func:`recbole_ssm.ops.ssd.ssd_scan`
for where each is used). The backward pass recomputes the states of ``BACKWARD_CHUNK`` positions at a
time from the states entering each chunk, recorded by a first pass (skipped for a single chunk).

The kernels also serve Hydra's mixer (:mod:`recbole_ssm.ops.hydra`): several scans ("directions") of
one x, each with its own dt, B and C, optionally running from the last position to the first
(``reverse``) and with their outputs moved one position on in scan order (``shift``: output t reads
the state after position t - 1, or t + 1 when reversed), summed into one y with the skip term D x
(D per head, or per position: Hydra's data-dependent diagonal), with no flipped or concatenated
copies of the inputs.
"""
import numpy as np
import torch
from numba import njit

from recbole_ssm.ops.autograd import needs_grad
from recbole_ssm.ops.compiled import JIT_OPTIONS, as_array, empty, exp32, run_parts, split, threads, zeros

# Positions whose states the backward pass holds at once, per (row, head) and thread:
# 257 * headdim * d_state floats (530 kB at headdim 16, d_state 32, float32). Sequences of up to 256
# positions then need no first pass (Hydra4Rec's training step at batch 256, length 200 took 9% less
# time than with chunks of 64).
BACKWARD_CHUNK = 256


@njit(**JIT_OPTIONS)
def _row_or_zeros(source, b, h, out):
    """out = source[b, h], or zeros where ``source`` has size 0 (no initial states, no final gradient)."""
    if source.shape[0]:
        out[:] = source[b, h]
    else:
        out[:] = 0


@njit(**JIT_OPTIONS)
def _scan_steps(length, reverse, shift, at, b):
    """Steps of row b's scan, in scan order, and the position read out last: every position (the last
    one in scan order) when ``at`` has size 0; else as far as output at[b] needs (the position before
    it in scan order when ``shift``, else at[b] itself), which may be no step at all."""
    if not at.shape[0]:
        return length, 0 if reverse else length - 1
    step = -1 if reverse else 1
    last = at[b] - step if shift else at[b]
    return (length - last if reverse else last + 1), last


@njit(**JIT_OPTIONS)
def _forward(x, dt, A, B, C, D, skip, mask, initial, final, y, b0, b1, h0, h1, reverse, shift, at):
    """Rows b0:b1, heads h0:h1. x: (batch, length, heads, p); dt: (batch, length, heads); A: (heads,);
    B, C: (batch, length, groups, n); D: the skip term, (1 or batch, 1 or length, heads, 1 or p), added
    if ``skip``; mask: (batch, length), False at padded positions; initial (batch, heads, p, n): the
    state before the first position; final, like it: written with the state after the last step. mask,
    initial and final of size 0 stand for none, zeros and not wanted. A padded position is skipped (no
    state change, no output) and nothing is written to it.
    at (batch,) of size 0: y like x; each position's read-out C_t . S_t is added to y at its position,
    moved one on in scan order if ``shift``, and D x_t at its own position. Else y is (batch, 1, heads,
    p) and gets row b's output at position at[b] only: the scan stops there (:func:`_scan_steps`) and
    reads out once.

    The state is held channels last, (n, heads * p): each of a group's states is then a multiply-add
    over a contiguous run of channels (the heads' decays and inputs spread over their channels first)
    and the read-out sums over the states into one vector per position, with no sum across a vector;
    four states at a time share the loads and stores of that sum. (1.5x faster than per head with the
    states innermost, at 8 heads of 16 channels, d_state 32, one group or two, forward or reversed.)"""
    length, heads, headdim = x.shape[1], x.shape[2], x.shape[3]
    groups, n_state = B.shape[2], B.shape[3]
    per_group = heads // groups
    step = -1 if reverse else 1
    masked = mask.shape[0] > 0
    one_position = at.shape[0] > 0
    c_first, c_stop = h0 * headdim, h1 * headdim      # the channels of heads h0:h1
    width = c_stop - c_first
    s = np.empty((n_state, width), x.dtype)
    decays = np.empty(width, x.dtype)                 # exp(dt A) of each channel's head
    drive = np.empty(width, x.dtype)                  # dt x
    readout = np.empty(width, x.dtype)                # C_t . S_t
    head_decays = np.empty(h1 - h0, x.dtype)          # exp(dt A) of each head
    head_of = np.empty(width, np.int64)               # each channel's head, from h0
    for c in range(width):
        head_of[c] = c // headdim
    for b in range(b0, b1):
        steps, last = _scan_steps(length, reverse, shift, at, b)
        for h in range(h0, h1):
            for p in range(headdim):
                for n in range(n_state):
                    s[n, (h - h0) * headdim + p] = initial[b, h, p, n] if initial.shape[0] else 0
        for k in range(steps):
            t = length - 1 - k if reverse else k
            if masked and not mask[b, t]:
                continue
            out = t + step if shift else t
            write = 0 <= out < length and (not masked or mask[b, out]) and (not one_position or t == last)
            x_t = x[b, t].reshape(heads * headdim)[c_first:c_stop]
            dt_t = dt[b, t, h0:h1]
            for h in range(h1 - h0):
                head_decays[h] = exp32(dt_t[h] * A[h0 + h])
            # One loop over the channels: a loop per head, over its headdim channels, made the scan
            # 1.1x as slow (one user, L = 200, 8 heads of 16 channels).
            for c in range(width):
                decays[c] = head_decays[head_of[c]]
                drive[c] = dt_t[head_of[c]] * x_t[c]
            for g in range(groups):
                c0 = (max(g * per_group, h0) - h0) * headdim
                c1 = (min((g + 1) * per_group, h1) - h0) * headdim
                if c0 < c1:
                    _update_group(s, decays, drive, B[b, t, g], C[b, t, g], readout, write, c0, c1)
            if write:
                y_t = y[b, 0 if one_position else out].reshape(heads * headdim)[c_first:c_stop]
                for c in range(width):
                    y_t[c] += readout[c]
            if skip and not one_position:
                _add_skip(D, x, b, t, h0, h1, y[b, t])
        if skip and one_position and (not masked or mask[b, at[b]]):
            _add_skip(D, x, b, at[b], h0, h1, y[b, 0])
        if final.shape[0]:
            for h in range(h0, h1):
                for p in range(headdim):
                    for n in range(n_state):
                        final[b, h, p, n] = s[n, (h - h0) * headdim + p]


@njit(inline="always", **JIT_OPTIONS)
def _update_group(s, decays, drive, B_t, C_t, readout, read, c0, c1):
    """One position of a group's channels c0:c1: s[n] = decays s[n] + drive B_t[n] for each state n
    (s: (n, channels)), and with ``read`` readout = sum_n C_t[n] s[n]. The loops run from 0 over 1-d
    slices: loops over c0:c1 of whole rows, or over the rows of s[:, c0:c1] (which Numba cannot tell
    are contiguous), did not vectorise and took 4x as long."""
    n_state, width = s.shape[0], c1 - c0
    decays, drive, readout = decays[c0:c1], drive[c0:c1], readout[c0:c1]
    if not read:
        for n in range(n_state):
            s_n, B_n = s[n, c0:c1], B_t[n]
            for c in range(width):
                s_n[c] = decays[c] * s_n[c] + drive[c] * B_n
        return
    readout[:] = 0
    n = 0
    while n + 4 <= n_state:
        s0, s1, s2, s3 = s[n, c0:c1], s[n + 1, c0:c1], s[n + 2, c0:c1], s[n + 3, c0:c1]
        B0, B1, B2, B3 = B_t[n], B_t[n + 1], B_t[n + 2], B_t[n + 3]
        C0, C1, C2, C3 = C_t[n], C_t[n + 1], C_t[n + 2], C_t[n + 3]
        for c in range(width):
            a, u = decays[c], drive[c]
            v0 = a * s0[c] + u * B0
            v1 = a * s1[c] + u * B1
            v2 = a * s2[c] + u * B2
            v3 = a * s3[c] + u * B3
            s0[c], s1[c], s2[c], s3[c] = v0, v1, v2, v3
            readout[c] += v0 * C0 + v1 * C1 + v2 * C2 + v3 * C3
        n += 4
    for n in range(n, n_state):
        s_n, B_n, C_n = s[n, c0:c1], B_t[n], C_t[n]
        for c in range(width):
            s_n[c] = decays[c] * s_n[c] + drive[c] * B_n
            readout[c] += s_n[c] * C_n


@njit(inline="always", **JIT_OPTIONS)
def _add_skip(D, x, b, t, h0, h1, y_t):
    """y_t[h] += D x[b, t, h] for heads h0:h1 (y_t: (heads, p)), D the skip term as :func:`_forward` takes it."""
    D_t, x_t = D[min(b, D.shape[0] - 1), min(t, D.shape[1] - 1)], x[b, t]
    per_channel = D_t.shape[1] > 1
    for h in range(h0, h1):
        for p in range(x_t.shape[1]):
            y_t[h, p] += D_t[h, p if per_channel else 0] * x_t[h, p]


@njit(**JIT_OPTIONS)
def _backward(x, dt, A, B, C, D, skip, mask, initial, grad_y, grad_final, dx, ddt, dB, dC, dA, dD, d_initial, b0, b1,
              chunk, reverse, shift, at):
    """Gradients of :func:`_forward` for rows b0:b1, all heads; grad_y like its y (with ``at``: the
    output at at[b] only, and only the steps that reach it are walked back). grad_final: dL/d(final
    state), like ``initial``. ddt like dt, zeroed by the caller: written at the positions walked back;
    d_initial like initial: written; dx like x, dB, dC (zeroed by the caller), dA (heads,), dD (like
    D): accumulated into. initial, grad_final and d_initial of size 0 stand for zeros, zeros and not
    wanted."""
    length, heads, headdim = x.shape[1], x.shape[2], x.shape[3]
    n_state = B.shape[3]
    per_group = heads // B.shape[2]
    step = -1 if reverse else 1
    masked = mask.shape[0] > 0
    one_position = at.shape[0] > 0
    entering = np.empty(((length + chunk - 1) // chunk, headdim, n_state), x.dtype)
    states = np.empty((chunk + 1, headdim, n_state), x.dtype)   # states[j + 1]: after scan step j
    decays = np.empty(chunk, x.dtype)
    no_grad = np.zeros(headdim, x.dtype)                        # dL/dy of an output moved past the end
    grad_s = np.empty((headdim, n_state), x.dtype)              # dL/dS_t
    grad_sB = np.empty(n_state, x.dtype)                        # sum_p dL/dS_t[p] x_t[p]
    grad_sC = np.empty(n_state, x.dtype)                        # sum_p dL/dy_t[p] S_t[p]
    for b in range(b0, b1):
        steps, last = _scan_steps(length, reverse, shift, at, b)
        chunks = (steps + chunk - 1) // chunk
        for h in range(heads):
            g = h // per_group
            s = states[0]
            _row_or_zeros(initial, b, h, s)
            if skip and one_position and (not masked or mask[b, at[b]]):   # D x went to the output at at[b]
                _add_skip_grad(D, x, grad_y[b, 0, h], b, at[b], h, dD, dx)
            for k in range(steps if chunks > 1 else 0):
                t = length - 1 - k if reverse else k
                if k % chunk == 0:
                    entering[k // chunk] = s
                if masked and not mask[b, t]:
                    continue
                a = exp32(dt[b, t, h] * A[h])
                for p in range(headdim):
                    xdt = x[b, t, h, p] * dt[b, t, h]
                    for n in range(n_state):
                        s[p, n] = a * s[p, n] + xdt * B[b, t, g, n]
            _row_or_zeros(grad_final, b, h, grad_s)
            for c in range(chunks - 1, -1, -1):
                k0 = c * chunk
                k1 = min(steps, k0 + chunk)
                if chunks > 1:
                    states[0] = entering[c]
                else:
                    _row_or_zeros(initial, b, h, states[0])
                for k in range(k0, k1):
                    t = length - 1 - k if reverse else k
                    j = k - k0
                    if masked and not mask[b, t]:
                        states[j + 1] = states[j]
                        continue
                    a = exp32(dt[b, t, h] * A[h])
                    decays[j] = a
                    for p in range(headdim):
                        xdt = x[b, t, h, p] * dt[b, t, h]
                        before, after = states[j, p], states[j + 1, p]
                        for n in range(n_state):
                            after[n] = a * before[n] + xdt * B[b, t, g, n]
                for k in range(k1 - 1, k0 - 1, -1):
                    t = length - 1 - k if reverse else k
                    if masked and not mask[b, t]:
                        ddt[b, t, h] = 0               # dL/dS passes through unchanged
                        continue
                    out = t + step if shift else t
                    j = k - k0
                    a, dt_t = decays[j], dt[b, t, h]
                    B_t, C_t, x_t = B[b, t, g], C[b, t, g], x[b, t, h]
                    written = 0 <= out < length and (not masked or mask[b, out]) and (not one_position or t == last)
                    gy_t = grad_y[b, 0 if one_position else out, h] if written else no_grad
                    if skip and not one_position:   # D x_t went to y at t itself
                        _add_skip_grad(D, x, grad_y[b, t, h], b, t, h, dD, dx)
                    grad_sB[:] = 0
                    grad_sC[:] = 0
                    grad_a = x.dtype.type(0)       # dL/da_t, summed over the state
                    grad_dt = x.dtype.type(0)
                    for p in range(headdim):
                        before, after, gs_p = states[j, p], states[j + 1, p], grad_s[p]
                        gy = gy_t[p]
                        grad_xB = x.dtype.type(0)  # sum_n dL/dS_t[p, n] B_t[n]
                        for n in range(n_state):
                            gs = gs_p[n] + gy * C_t[n]
                            grad_sC[n] += gy * after[n]
                            grad_a += gs * before[n]
                            grad_xB += gs * B_t[n]
                            grad_sB[n] += gs * x_t[p]
                            gs_p[n] = gs * a
                        dx[b, t, h, p] += dt_t * grad_xB
                        grad_dt += grad_xB * x_t[p]
                    for n in range(n_state):
                        dB[b, t, g, n] += dt_t * grad_sB[n]
                        dC[b, t, g, n] += grad_sC[n]
                    ddt[b, t, h] = grad_a * a * A[h] + grad_dt
                    dA[h] += grad_a * a * dt_t
            if d_initial.shape[0]:
                d_initial[b, h] = grad_s


@njit(**JIT_OPTIONS)
def _add_skip_grad(D, x, grad_y_t, b, t, h, dD, dx):
    """The gradients of y_t += D x[b, t, h] (:func:`_add_skip`), given dL/dy_t, into dD and dx."""
    D_i, D_j = min(b, D.shape[0] - 1), min(t, D.shape[1] - 1)
    D_t, dD_t, x_t = D[D_i, D_j, h], dD[D_i, D_j, h], x[b, t, h]
    for p in range(x_t.shape[0]):
        q = min(p, D_t.shape[0] - 1)
        dD_t[q] += grad_y_t[p] * x_t[p]
        dx[b, t, h, p] += D_t[q] * grad_y_t[p]


def _scans_forward(reverse, shift, return_final_states, x, A, D, initial_states, mask, positions, *dt_B_C):
    """The forward kernels on the callers' tensors (arguments as :meth:`_FusedScans.forward`): y (b, l,
    h, p), or (b, 1, h, p) at ``positions``, and the final states in the computing dtype, and the
    kernels' inputs (which the backward pass needs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    b, l, h, p = x.shape
    n = dt_B_C[1].shape[-1]
    D_4d = skip_term(D, h, dtype)
    none = torch.empty(0, 0, 0, 0, dtype=dtype)     # no initial states (zeros), no final states wanted
    initial = none if initial_states is None else as_array(initial_states, dtype)
    x_, A_ = as_array(x, dtype), as_array(A, dtype)
    mask = torch.empty(0, 0, dtype=torch.bool) if mask is None else mask.contiguous()
    positions = torch.empty(0, dtype=torch.int64) if positions is None else positions.to(torch.int64).contiguous()
    scans = [as_array(t, dtype) for t in dt_B_C]
    finals = [empty((b, h, p, n), dtype) if return_final_states else none for _ in reverse]
    y = zeros((b, 1 if len(positions) else l, h, p), dtype)
    x_np, A_np, D_np, mask_np, positions_np, initial_np, y_np = (
        t.numpy() for t in (x_, A_, D_4d, mask, positions, initial, y))
    # The first direction adds the skip term.
    directions = [(*(t.numpy() for t in scans[3 * i:3 * i + 3]), finals[i].numpy(), backwards,
                   i == 0 and D is not None) for i, backwards in enumerate(reverse)]

    def scan(b0, b1, h0, h1):
        for dt_np, B_np, C_np, final_np, backwards, skip in directions:
            _forward(x_np, dt_np, A_np, B_np, C_np, D_np, skip, mask_np, initial_np, final_np, y_np, b0, b1, h0,
                     h1, backwards, shift, positions_np)

    if b >= threads():
        run_parts(lambda b0, b1: scan(b0, b1, 0, h), split(b, threads()))
    else:  # few rows: the heads are independent, split them instead
        for row in range(b):
            run_parts(lambda h0, h1: scan(row, row + 1, h0, h1), split(h, threads()))
    return y, finals, (x_, A_, D_4d, mask, positions, initial, *scans)


def skip_term(D, heads, dtype):
    """D (heads,), (heads, p) or per position (b, l, heads) as the kernels take it, (1 or b, 1 or l,
    heads, 1 or p); zeros (1, 1, heads, 1) for None."""
    if D is None:
        return torch.zeros(1, 1, heads, 1, dtype=dtype)
    D = D.detach().to(dtype)
    return (D.unsqueeze(-1) if D.dim() == 3 else D.reshape(1, 1, heads, -1)).contiguous()


def _scans(reverse, shift, return_final_states, x, A, D, initial_states, mask, positions, *dt_B_C):
    """:class:`_FusedScans` where autograd needs it, else the kernels without its bookkeeping."""
    if needs_grad(x, A, D, initial_states, *dt_B_C):
        return _FusedScans.apply(reverse, shift, return_final_states, x, A, D, initial_states, mask, positions,
                                 *dt_B_C)
    y, finals, _ = _scans_forward(reverse, shift, return_final_states, x, A, D, initial_states, mask, positions,
                                  *dt_B_C)
    y = _without_position_axis(y, positions).to(x.dtype)
    return (y, *finals) if return_final_states else y


def _without_position_axis(y, positions):
    """y (b, 1, h, p) at positions -> (b, h, p); y (b, l, h, p) unchanged when ``positions`` is None."""
    return y if positions is None else y.squeeze(1)


class _FusedScans(torch.autograd.Function):
    """Scans of one x, one per direction, summed into y; see the module's docstring."""

    @staticmethod
    def forward(ctx, reverse, shift, return_final_states, x, A, D, initial_states, mask, positions, *dt_B_C):
        """reverse: a bool per direction; dt_B_C: dt, B, C of each direction in turn; D, mask (b, l),
        positions (b,) and initial_states (one direction only) may be None. Returns y (0 at padded
        positions), (b, l, h, p), or (b, h, p) at ``positions`` only, and with ``return_final_states``
        the final states too, one per direction."""
        y, finals, saved = _scans_forward(reverse, shift, return_final_states, x, A, D, initial_states, mask,
                                          positions, *dt_B_C)
        ctx.save_for_backward(*saved)
        ctx.reverse, ctx.shift = reverse, shift
        ctx.input_dtypes = [None if t is None else t.dtype for t in (x, A, D, initial_states, *dt_B_C)]
        ctx.D_shape = None if D is None else D.shape
        y = _without_position_axis(y, positions).to(x.dtype)
        return (y, *finals) if return_final_states else y

    @staticmethod
    def backward(ctx, grad_y, *grad_finals):
        x, A, D_4d, mask, positions, initial, *scans = ctx.saved_tensors
        grad_y = as_array(grad_y.unsqueeze(1) if len(positions) else grad_y, x.dtype)
        dx = zeros(x.shape, x.dtype)
        none = torch.empty(0, 0, 0, 0, dtype=x.dtype)
        d_initial = [none if ctx.input_dtypes[3] is None else empty(initial.shape, x.dtype) for _ in ctx.reverse]
        d_scans = [zeros(t.shape, t.dtype) for t in scans]     # per direction: ddt, dB, dC
        if not grad_finals:   # the final states were not returned
            grad_finals = [None] * len(ctx.reverse)
        grad_finals = [none if g is None else as_array(g, x.dtype) for g in grad_finals]
        x_np, A_np, D_np, mask_np, positions_np, initial_np, grad_y_np, dx_np = (
            t.numpy() for t in (x, A, D_4d, mask, positions, initial, grad_y, dx))
        directions = [(*(t.numpy() for t in scans[3 * i:3 * i + 3]), grad_finals[i].numpy(),
                       *(t.numpy() for t in d_scans[3 * i:3 * i + 3]), d_initial[i].numpy(), backwards,
                       i == 0 and ctx.D_shape is not None)
                      for i, backwards in enumerate(ctx.reverse)]

        def scan(b0, b1):  # each thread sums the parameters' gradients over its rows
            dA, dD = np.zeros_like(A_np), np.zeros_like(D_np)
            for dt_np, B_np, C_np, grad_final_np, ddt_np, dB_np, dC_np, d_initial_np, backwards, skip in directions:
                _backward(x_np, dt_np, A_np, B_np, C_np, D_np, skip, mask_np, initial_np, grad_y_np, grad_final_np,
                          dx_np, ddt_np, dB_np, dC_np, dA, dD, d_initial_np, b0, b1, BACKWARD_CHUNK, backwards,
                          ctx.shift, positions_np)
            return dA, dD

        parts = run_parts(scan, split(x.shape[0], threads()))
        dA, dD = (torch.from_numpy(sum(part[i] for part in parts)) for i in range(2))
        if ctx.D_shape is not None:
            dD = dD.reshape(ctx.D_shape)
        d_initial_states = sum(d_initial) if ctx.input_dtypes[3] is not None else None
        grads = [None if dtype is None else grad.to(dtype)
                 for grad, dtype in zip((dx, dA, dD, d_initial_states, *d_scans), ctx.input_dtypes)]
        # None for reverse, shift, return_final_states, mask and positions
        return (None, None, None, *grads[:4], None, None, *grads[4:])


def ssd_scan_fused(x, dt, A, B, C, D=None, initial_states=None, return_final_states=False, mask=None,
                   positions=None):
    """The SSD scan by the compiled kernels; arguments and result as
    :func:`recbole_ssm.ops.ssd.ssd_scan` (no chunk size: it changes nothing here). With ``positions``,
    each row is scanned up to its position only."""
    return _scans((False,), False, return_final_states, x, A, D, initial_states, mask, positions, dt, B, C)


def shifted_bidirectional_scans_fused(x, dt_fwd, dt_bwd, A, B_fwd, C_fwd, B_bwd, C_bwd, D, mask=None, positions=None):
    """Hydra's mixer by the compiled kernels: y[t] = (forward scan's output at t - 1) + (backward scan's
    output at t + 1), each 0 past the ends, + D x[t]. Shapes as :func:`recbole_ssm.ops.hydra.hydra_mixer`;
    padded positions (``mask`` False) are skipped by both scans and get y = 0. Returns (b, l, h, p), or
    (b, h, p) at ``positions`` (b,): then the forward scan stops before each row's position and the
    backward scan runs from the end down to the position after it (none at a row's last position)."""
    return _scans((False, True), True, False, x, A, D, None, mask, positions, dt_fwd, B_fwd, C_fwd, dt_bwd, B_bwd,
                  C_bwd)
