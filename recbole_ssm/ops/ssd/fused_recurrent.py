"""The SSD scan as compiled CPU kernels (Numba): the recurrence position by position, forward and
backward, with initial and final states.

Each (batch row, head) is scanned with its (headdim, d_state) state in cache; per position that is
one scalar decay, a rank-one update and a matrix-vector read-out: O(length) work with no matrix
products and no padding to whole chunks, which beats the chunked matrix-product form wherever the
per-call overhead of PyTorch's many small operations dominates (see :func:`recbole_ssm.ops.ssd.ssd_scan`
for where each is used). The backward pass recomputes the states of ``BACKWARD_CHUNK`` positions at a
time from the states entering each chunk, recorded by a first pass (skipped for a single chunk).
"""
import numpy as np
import torch
from numba import njit

from recbole_ssm.ops.compiled import JIT_OPTIONS, exp32, run_parts, split, threads

# Positions whose states the backward pass holds at once, per (row, head) and thread:
# 65 * headdim * d_state floats (130 kB at headdim 16, d_state 32, float32).
BACKWARD_CHUNK = 64


@njit(**JIT_OPTIONS)
def _forward(x, dt, A, B, C, D, state, y, b0, b1, h0, h1):
    """Rows b0:b1, heads h0:h1. x, y: (batch, length, heads, p); dt: (batch, length, heads); A: (heads,);
    B, C: (batch, length, groups, n); D: (heads, p); state (batch, heads, p, n): the state before the
    first position, overwritten with the state after the last one."""
    length, heads, headdim = x.shape[1], x.shape[2], x.shape[3]
    per_group = heads // B.shape[2]
    for b in range(b0, b1):
        for h in range(h0, h1):
            g = h // per_group
            s = state[b, h]
            for t in range(length):
                a = exp32(dt[b, t, h] * A[h])
                B_t, C_t, x_t, y_t = B[b, t, g], C[b, t, g], x[b, t, h], y[b, t, h]
                for p in range(headdim):
                    xdt = x_t[p] * dt[b, t, h]
                    s_p = s[p]
                    acc = D[h, p] * x_t[p]
                    for n in range(s_p.shape[0]):
                        s_p[n] = a * s_p[n] + xdt * B_t[n]
                        acc += s_p[n] * C_t[n]
                    y_t[p] = acc


@njit(**JIT_OPTIONS)
def _backward(x, dt, A, B, C, D, initial, grad_y, grad_final, dx, ddt, dB, dC, dA, dD, d_initial, b0, b1, chunk):
    """Gradients of :func:`_forward` for rows b0:b1, all heads. grad_final: dL/d(final state), like
    ``initial``. dx like x, ddt like dt, d_initial like initial: written; dB, dC (zeroed by the caller),
    dA (heads,), dD (heads, p): accumulated into."""
    length, heads, headdim = x.shape[1], x.shape[2], x.shape[3]
    n_state = B.shape[3]
    per_group = heads // B.shape[2]
    chunks = (length + chunk - 1) // chunk
    entering = np.empty((chunks, headdim, n_state), x.dtype)
    states = np.empty((chunk + 1, headdim, n_state), x.dtype)   # states[j + 1]: after position j
    decays = np.empty(chunk, x.dtype)
    grad_s = np.empty((headdim, n_state), x.dtype)              # dL/dS_t
    grad_sB = np.empty(n_state, x.dtype)                        # sum_p dL/dS_t[p] x_t[p]
    grad_sC = np.empty(n_state, x.dtype)                        # sum_p dL/dy_t[p] S_t[p]
    for b in range(b0, b1):
        for h in range(heads):
            g = h // per_group
            s = states[0]
            s[:] = initial[b, h]
            for t in range(length if chunks > 1 else 0):
                if t % chunk == 0:
                    entering[t // chunk] = s
                a = exp32(dt[b, t, h] * A[h])
                for p in range(headdim):
                    xdt = x[b, t, h, p] * dt[b, t, h]
                    for n in range(n_state):
                        s[p, n] = a * s[p, n] + xdt * B[b, t, g, n]
            grad_s[:] = grad_final[b, h]
            for c in range(chunks - 1, -1, -1):
                t0 = c * chunk
                t1 = min(length, t0 + chunk)
                states[0] = entering[c] if chunks > 1 else initial[b, h]
                for t in range(t0, t1):
                    j = t - t0
                    a = exp32(dt[b, t, h] * A[h])
                    decays[j] = a
                    for p in range(headdim):
                        xdt = x[b, t, h, p] * dt[b, t, h]
                        before, after = states[j, p], states[j + 1, p]
                        for n in range(n_state):
                            after[n] = a * before[n] + xdt * B[b, t, g, n]
                for t in range(t1 - 1, t0 - 1, -1):
                    j = t - t0
                    a, dt_t = decays[j], dt[b, t, h]
                    B_t, C_t, x_t, gy_t = B[b, t, g], C[b, t, g], x[b, t, h], grad_y[b, t, h]
                    grad_sB[:] = 0
                    grad_sC[:] = 0
                    grad_a = x.dtype.type(0)       # dL/da_t, summed over the state
                    grad_dt = x.dtype.type(0)
                    for p in range(headdim):
                        before, after, gs_p = states[j, p], states[j + 1, p], grad_s[p]
                        gy = gy_t[p]
                        dD[h, p] += gy * x_t[p]
                        grad_xB = x.dtype.type(0)  # sum_n dL/dS_t[p, n] B_t[n]
                        for n in range(n_state):
                            gs = gs_p[n] + gy * C_t[n]
                            grad_sC[n] += gy * after[n]
                            grad_a += gs * before[n]
                            grad_xB += gs * B_t[n]
                            grad_sB[n] += gs * x_t[p]
                            gs_p[n] = gs * a
                        dx[b, t, h, p] = D[h, p] * gy + dt_t * grad_xB
                        grad_dt += grad_xB * x_t[p]
                    for n in range(n_state):
                        dB[b, t, g, n] += dt_t * grad_sB[n]
                        dC[b, t, g, n] += grad_sC[n]
                    ddt[b, t, h] = grad_a * a * A[h] + grad_dt
                    dA[h] += grad_a * a * dt_t
            d_initial[b, h] = grad_s


class _FusedSSD(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states):
        dtype = torch.promote_types(x.dtype, torch.float32)
        b, l, h, p = x.shape
        n = B.shape[-1]
        D_hp = (torch.zeros(h, p, dtype=dtype) if D is None
                else D.detach().to(dtype).reshape(h, -1).expand(h, p).contiguous())
        initial = (torch.zeros(b, h, p, n, dtype=dtype) if initial_states is None
                   else initial_states.detach().to(dtype).contiguous())
        inputs = [t.detach().to(dtype).contiguous() for t in (x, dt, A, B, C)] + [D_hp, initial]
        state = initial.clone()
        y = torch.empty(b, l, h, p, dtype=dtype)
        arrays = [t.numpy() for t in inputs[:6]]
        state_np, y_np = state.numpy(), y.numpy()
        if b >= threads():
            run_parts(lambda b0, b1: _forward(*arrays, state_np, y_np, b0, b1, 0, h), split(b, threads()))
        else:  # few rows: the heads are independent, split them instead
            for row in range(b):
                run_parts(lambda h0, h1: _forward(*arrays, state_np, y_np, row, row + 1, h0, h1),
                          split(h, threads()))
        ctx.save_for_backward(*inputs)
        ctx.input_dtypes = [None if t is None else t.dtype for t in (x, dt, A, B, C, D, initial_states)]
        ctx.D_shape = None if D is None else D.shape
        return y.to(x.dtype), state

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, dt, A, B, C, D_hp, initial = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype).contiguous()
        grad_final = torch.zeros_like(initial) if grad_final is None else grad_final.to(x.dtype).contiguous()
        dx, ddt, d_initial = torch.empty_like(x), torch.empty_like(dt), torch.empty_like(initial)
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        arrays = [t.numpy() for t in (x, dt, A, B, C, D_hp, initial, grad_y, grad_final, dx, ddt, dB, dC)]

        def scan(b0, b1):  # each thread sums the parameters' gradients over its rows
            dA, dD = np.zeros_like(arrays[2]), np.zeros_like(arrays[5])
            _backward(*arrays, dA, dD, d_initial.numpy(), b0, b1, BACKWARD_CHUNK)
            return dA, dD

        parts = run_parts(scan, split(x.shape[0], threads()))
        dA, dD = (torch.from_numpy(sum(part[i] for part in parts)) for i in range(2))
        if ctx.D_shape is not None:
            dD = dD.sum(1) if len(ctx.D_shape) == 1 else dD
        grads = (dx, ddt, dA, dB, dC, dD, d_initial)
        return tuple(None if dtype is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.input_dtypes))


def ssd_scan_fused(x, dt, A, B, C, D=None, initial_states=None, return_final_states=False):
    """The SSD scan by the compiled kernels; arguments and result as
    :func:`recbole_ssm.ops.ssd.chunked.ssd_scan_torch` (no chunk size: it changes nothing here)."""
    y, final_states = _FusedSSD.apply(x, dt, A, B, C, D, initial_states)
    return (y, final_states) if return_final_states else y
