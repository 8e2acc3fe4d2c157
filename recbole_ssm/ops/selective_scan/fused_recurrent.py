"""The selective scan as compiled CPU kernels (Numba): the recurrence over time, fused with the step
size's bias and softplus, the skip term D and the gate silu(z), forward and backward.

Each batch row is scanned with its whole (d_state, d_inner) state in cache, position after position;
the inner loop runs over the channels, which are contiguous in the block's activations, (batch,
length, d_inner). Nothing of size (batch, length, d_inner, d_state) is ever formed: the backward
pass recomputes the states of a chunk of ``BACKWARD_CHUNK`` positions at a time from the states
entering each chunk, which a first pass records (skipped when the sequence is one chunk).
"""
import numpy as np
import torch
from numba import njit

from recbole_ssm.ops.autograd import needs_grad
from recbole_ssm.ops.compiled import (JIT_OPTIONS, LOG2E, as_array, empty, pow2, run_parts, sigmoid, silu_slope,
                                      softplus, split, threads, zeros)

# Positions the backward pass walks back at once, per batch row and thread: it holds eight (chunk,
# d_inner) arrays (1 MB at d_inner 128, float32) and the states entering each chunk. Sequences of up
# to 256 positions then need no first pass (Mamba4Rec's training step at batch 256, length 200 took
# 12% less time than with chunks of 64).
BACKWARD_CHUNK = 256


@njit(inline="always", **JIT_OPTIONS)
def _step_rates(delta_t, bias, use_softplus, out):
    """out[d] = softplus(delta_t[d] + bias[d]), or without softplus."""
    for d in range(out.shape[0]):
        raw = delta_t[d] + bias[d]
        out[d] = softplus(raw) if use_softplus else raw


@njit(inline="always", **JIT_OPTIONS)
def _start_position(u_t, dt, D, drive, y):
    """drive[d] = dt[d] u_t[d], and y[d] = D[d] u_t[d], the skip term the read-out adds to."""
    for d in range(u_t.shape[0]):
        drive[d] = dt[d] * u_t[d]
        y[d] = D[d] * u_t[d]


@njit(inline="always", **JIT_OPTIONS)
def _update_states(h, A_log2, dt, drive, B_t, C_t, y):
    """One position of every channel's states h (n, d): h[n] = exp(dt A[n]) h[n] + drive B_t[n], and
    y += sum_n C_t[n] h[n]. A_log2 (n, d): A log2 e; dt, drive, y (d,); B_t, C_t (n,)."""
    n_state, d_inner = A_log2.shape
    n = 0
    while n + 4 <= n_state:   # four states at a time share the loads and stores of y
        A_0, A_1, A_2, A_3 = A_log2[n], A_log2[n + 1], A_log2[n + 2], A_log2[n + 3]
        h_0, h_1, h_2, h_3 = h[n], h[n + 1], h[n + 2], h[n + 3]
        B_0, B_1, B_2, B_3 = B_t[n], B_t[n + 1], B_t[n + 2], B_t[n + 3]
        C_0, C_1, C_2, C_3 = C_t[n], C_t[n + 1], C_t[n + 2], C_t[n + 3]
        for d in range(d_inner):
            r, v = dt[d], drive[d]
            s_0 = pow2(r * A_0[d]) * h_0[d] + v * B_0
            s_1 = pow2(r * A_1[d]) * h_1[d] + v * B_1
            s_2 = pow2(r * A_2[d]) * h_2[d] + v * B_2
            s_3 = pow2(r * A_3[d]) * h_3[d] + v * B_3
            h_0[d], h_1[d], h_2[d], h_3[d] = s_0, s_1, s_2, s_3
            y[d] += s_0 * C_0 + s_1 * C_1 + s_2 * C_2 + s_3 * C_3
        n += 4
    for n in range(n, n_state):
        A2_n, h_n, B_tn, C_tn = A_log2[n], h[n], B_t[n], C_t[n]
        for d in range(d_inner):
            h_n[d] = pow2(dt[d] * A2_n[d]) * h_n[d] + drive[d] * B_tn
            y[d] += h_n[d] * C_tn


@njit(inline="always", **JIT_OPTIONS)
def _gate(y, z_t, out_t):
    """out_t = y silu(z_t), or y where z_t has size 0 (no gate)."""
    if z_t.shape[0]:
        for d in range(y.shape[0]):
            out_t[d] = y[d] * z_t[d] * sigmoid(z_t[d])
    else:
        out_t[:] = y


@njit(**JIT_OPTIONS)
def _forward(u, delta, A_T, B, C, D, z, bias, use_softplus, out, state, b0, b1):
    """Rows b0:b1. u, delta, z, out: (batch, length, d); A_T: (n, d); B, C: (batch, length, n);
    D, bias: (d,); z of shape (0, 0, 0) for no gate; state (batch, n, d): the state before the first
    position, overwritten with the state after the last one. (The channel loops run over whole rows:
    a loop over a sub-range of channels vectorised 7x worse.)"""
    length, d_inner = u.shape[1], u.shape[2]
    dt = np.empty(d_inner, u.dtype)
    drive = np.empty(d_inner, u.dtype)
    y = np.empty(d_inner, u.dtype)
    no_gate = np.empty(0, u.dtype)
    A_log2 = A_T * u.dtype.type(LOG2E)           # exp(dt A) = 2**(dt A log2 e)
    for b in range(b0, b1):
        for t in range(length):
            _step_rates(delta[b, t], bias, use_softplus, dt)
            _start_position(u[b, t], dt, D, drive, y)
            _update_states(state[b], A_log2, dt, drive, B[b, t], C[b, t], y)
            _gate(y, z[b, t] if z.shape[0] else no_gate, out[b, t])


@njit(**JIT_OPTIONS)
def _backward(u, delta, A_T, B, C, D, z, bias, use_softplus, initial, grad_out,
              du, ddelta, dz, dA_T, dB, dC, dD, dbias, d_initial, b0, b1, chunk):
    """Gradients of :func:`_forward` from the states ``initial`` (batch, n, d), for rows b0:b1, all
    channels. du, ddelta, dz: like u; dB, dC: like B; d_initial: like initial (these are written);
    dA_T (n, d), dD, dbias (d,): accumulated into.

    Within a chunk the loop runs over the states n outside and the positions inside: one state's
    values along the chunk, (chunk, d), are recomputed and walked back while they are in cache, and
    what sums over the states (the read-out, dL/d(dt u), dL/d(dt)) builds up in (chunk, d) arrays."""
    length, d_inner = u.shape[1], u.shape[2]
    n_state = A_T.shape[0]
    chunks = (length + chunk - 1) // chunk
    entering = np.empty((chunks, n_state, d_inner), u.dtype)   # state before each chunk
    h = np.empty((chunk + 1, d_inner), u.dtype)                # h[j + 1]: one state after position j
    decays = np.empty((chunk, d_inner), u.dtype)               # exp(dt A) of that state
    rates = np.empty((chunk, d_inner), u.dtype)                # softplus'd step sizes
    drive = np.empty((chunk, d_inner), u.dtype)                # dt u
    grad_y = np.empty((chunk, d_inner), u.dtype)               # dL/dy_t, y before the gate
    readout = np.empty((chunk, d_inner), u.dtype)              # <h_t, C_t>
    grad_hB = np.empty((chunk, d_inner), u.dtype)              # sum_n dL/dh_t[n] B_t[n]
    grad_decay = np.empty((chunk, d_inner), u.dtype)           # sum_n dL/da_t[n] a_t[n] A[n]
    grad_h = np.empty((n_state, d_inner), u.dtype)             # dL/dh entering the chunk after
    g = np.empty(d_inner, u.dtype)
    A_log2 = A_T * u.dtype.type(LOG2E)                         # exp(dt A) = 2**(dt A log2 e)
    for b in range(b0, b1):
        # States entering each chunk (no pass needed when the sequence is one chunk), run in grad_h,
        # which is zeroed after.
        state = grad_h
        state[:] = initial[b]
        for t in range(length if chunks > 1 else 0):
            if t % chunk == 0:
                entering[t // chunk] = state
            _step_rates(delta[b, t], bias, use_softplus, rates[0])
            for d in range(d_inner):
                drive[0, d] = rates[0, d] * u[b, t, d]
            for n in range(n_state):
                A2_n, h_n, B_tn = A_log2[n], state[n], B[b, t, n]
                for d in range(d_inner):
                    h_n[d] = pow2(rates[0, d] * A2_n[d]) * h_n[d] + drive[0, d] * B_tn
        grad_h[:] = 0
        for c in range(chunks - 1, -1, -1):
            t0 = c * chunk
            steps = min(length, t0 + chunk) - t0
            for j in range(steps):
                t = t0 + j
                _step_rates(delta[b, t], bias, use_softplus, rates[j])
                for d in range(d_inner):
                    drive[j, d] = rates[j, d] * u[b, t, d]
                    readout[j, d] = 0
                    grad_hB[j, d] = 0
                    grad_decay[j, d] = 0
                    if z.shape[0]:
                        z_td = z[b, t, d]
                        grad_y[j, d] = grad_out[b, t, d] * z_td * sigmoid(z_td)   # silu(z)
                    else:
                        grad_y[j, d] = grad_out[b, t, d]
            for n in range(n_state):
                A_n, A2_n, dA_n = A_T[n], A_log2[n], dA_T[n]
                h[0] = entering[c, n] if chunks > 1 else initial[b, n]
                for j in range(steps):          # this state along the chunk
                    B_tn, C_tn = B[b, t0 + j, n], C[b, t0 + j, n]
                    for d in range(d_inner):
                        decays[j, d] = pow2(rates[j, d] * A2_n[d])
                        h[j + 1, d] = decays[j, d] * h[j, d] + drive[j, d] * B_tn
                        readout[j, d] += h[j + 1, d] * C_tn
                g[:] = grad_h[n]
                for j in range(steps - 1, -1, -1):   # and back
                    B_tn, C_tn = B[b, t0 + j, n], C[b, t0 + j, n]
                    sum_C = u.dtype.type(0)
                    sum_B = u.dtype.type(0)
                    for d in range(d_inner):
                        g_d = g[d] + grad_y[j, d] * C_tn                    # dL/dh_t
                        sum_C += grad_y[j, d] * h[j + 1, d]
                        sum_B += g_d * drive[j, d]
                        grad_hB[j, d] += g_d * B_tn
                        s = g_d * h[j, d] * decays[j, d]                   # dL/d(dt A) for this n
                        grad_decay[j, d] += s * A_n[d]
                        dA_n[d] += s * rates[j, d]
                        g[d] = g_d * decays[j, d]                          # dL/dh_{t-1}, via h_t
                    dC[b, t0 + j, n] = sum_C
                    dB[b, t0 + j, n] = sum_B
                grad_h[n] = g
            for j in range(steps):
                t = t0 + j
                u_t = u[b, t]
                for d in range(d_inner):
                    if z.shape[0]:
                        z_td = z[b, t, d]
                        y_td = readout[j, d] + D[d] * u_t[d]
                        dz[b, t, d] = grad_out[b, t, d] * y_td * silu_slope(z_td, sigmoid(z_td))
                    dD[d] += grad_y[j, d] * u_t[d]
                    du[b, t, d] = grad_y[j, d] * D[d] + rates[j, d] * grad_hB[j, d]
                    grad_dt = grad_decay[j, d] + u_t[d] * grad_hB[j, d]
                    if use_softplus:
                        grad_dt *= sigmoid(delta[b, t, d] + bias[d])     # softplus' = sigmoid
                    ddelta[b, t, d] = grad_dt
                    dbias[d] += grad_dt
        d_initial[b] = grad_h


def _time_major(t, dtype):
    """(batch, c, length) -> a contiguous (batch, length, c) array of ``dtype`` (no copy when the
    tensor is a transposed view of such memory, as the blocks' activations are)."""
    return as_array(t.transpose(1, 2), dtype)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """The forward kernels on the callers' tensors: y (b, l, d) in the computing dtype, the last state
    (b, n, d), and the kernels' inputs and initial state (which the backward pass needs)."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    batch, d_inner, length = u.shape
    initial = None if initial_state is None else _time_major(initial_state, dtype)     # (b, n, d); None: zeros
    inputs = (_time_major(u, dtype), _time_major(delta, dtype), as_array(A.t(), dtype),
              _time_major(B, dtype), _time_major(C, dtype), _vector_or_zeros(D, d_inner, dtype),
              _time_major(z, dtype) if z is not None else torch.empty(0, 0, 0, dtype=dtype),
              _vector_or_zeros(delta_bias, d_inner, dtype))
    out = empty((batch, length, d_inner), dtype)
    # The kernel turns it into the last state.
    state = zeros((batch, A.shape[1], d_inner), dtype) if initial is None else empty(initial.shape, dtype).copy_(initial)
    if batch >= threads() or length == 0:
        arrays = [t.numpy() for t in (*inputs, out, state)]
        run_parts(lambda b0, b1: _forward(*arrays[:8], bool(delta_softplus), *arrays[8:], b0, b1),
                  split(batch, threads()))
    else:  # few rows: the channels are independent, each thread scans its own slice of them
        def channels(d0, d1):  # every tensor but B and C has the channels last
            part = [t if i in (3, 4) or not t.numel() else t[..., d0:d1].contiguous()
                    for i, t in enumerate((*inputs, out, state))]
            arrays = [t.numpy() for t in part]
            _forward(*arrays[:8], bool(delta_softplus), *arrays[8:], 0, batch)
            out[..., d0:d1], state[..., d0:d1] = part[8], part[9]

        run_parts(channels, split(d_inner, threads()))
    return out, state, inputs, initial


class _FusedSelectiveScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state):
        out, state, inputs, initial = _scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                    delta_softplus)
        ctx.save_for_backward(*inputs, initial)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.input_dtypes = [None if t is None else t.dtype
                            for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        y = out.transpose(1, 2).to(u.dtype)
        if not return_last_state:
            return y
        last_state = state.transpose(1, 2)                                  # (b, d, n)
        ctx.mark_non_differentiable(last_state)
        return y, last_state

    @staticmethod
    def backward(ctx, grad_out, *grad_last_state):  # the last state is not differentiable
        u, delta, A_T, B, C, D, z, bias, initial = ctx.saved_tensors
        if initial is None:
            initial = zeros((u.shape[0], A_T.shape[0], u.shape[2]), u.dtype)
        grads = [empty(t.shape, t.dtype) for t in (u, u, z, B, C, initial)]   # du, ddelta, dz, dB, dC, d_initial
        du, ddelta, dz, dB, dC, d_initial = (t.numpy() for t in grads)
        arrays = [t.numpy() for t in (u, delta, A_T, B, C, D, z, bias)]
        grad_out = _time_major(grad_out, u.dtype).numpy()

        def scan(b0, b1):  # each thread sums the parameters' gradients over its rows
            dA_T, dD, dbias = np.zeros_like(arrays[2]), np.zeros_like(arrays[5]), np.zeros_like(arrays[7])
            _backward(*arrays, ctx.delta_softplus, initial.numpy(), grad_out, du, ddelta, dz, dA_T, dB, dC,
                      dD, dbias, d_initial, b0, b1, BACKWARD_CHUNK)
            return dA_T, dD, dbias

        parts = run_parts(scan, split(u.shape[0], threads()))
        dA_T, dD, dbias = (torch.from_numpy(sum(part[i] for part in parts)) for i in range(3))
        du, ddelta, dz, dB, dC, d_initial = (t.transpose(1, 2) for t in grads)  # back to the callers' layout
        grads = (du, ddelta, dA_T.t(), dB, dC, dD, dz, dbias, d_initial)
        return tuple(None if dtype is None else grad.to(dtype)
                     for grad, dtype in zip(grads, ctx.input_dtypes)) + (None, None)


def _vector_or_zeros(t, size, dtype):
    return torch.zeros(size, dtype=dtype) if t is None else as_array(t, dtype)


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         initial_state=None, return_last_state=False):
    """The selective scan by the compiled kernels; arguments and result as
    :func:`recbole_ssm.ops.selective_scan.selective_scan` (CPU tensors; computed in float32, or in
    float64 for float64 inputs)."""
    if needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return _FusedSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                         return_last_state)
    out, state, _, _ = _scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    y = out.transpose(1, 2).to(u.dtype)   # without autograd's bookkeeping (a tenth of a call at batch 1)
    return (y, state.transpose(1, 2)) if return_last_state else y
