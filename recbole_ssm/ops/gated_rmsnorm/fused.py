"""Gated RMSNorm as compiled CPU kernels (Numba): gate, normalisation and weight in one pass per row,
forward and backward (PyTorch's version is eight elementwise operations forward and about twice as
many backward, each over the whole (batch, length, d) activation)."""
import math

import numpy as np
import torch
from numba import njit

from recbole_ssm.ops.autograd import needs_grad
from recbole_ssm.ops.compiled import JIT_OPTIONS, as_array, empty, run_parts, sigmoid, silu_slope, split, threads


@njit(inline="always", **JIT_OPTIONS)
def _gate(z_r, gate, slope):
    """gate = silu(z_r) and, if ``slope`` has a size, slope = silu'(z_r)."""
    if slope.shape[0]:
        for c in range(z_r.shape[0]):
            sig = sigmoid(z_r[c])
            gate[c] = z_r[c] * sig
            slope[c] = silu_slope(z_r[c], sig)
    else:
        for c in range(z_r.shape[0]):
            gate[c] = z_r[c] * sigmoid(z_r[c])


@njit(inline="always", **JIT_OPTIONS)
def _normalised_input(x_r, gate, gate_first, v):
    """v = x_r * gate if ``gate_first`` else x_r."""
    if gate_first:
        for c in range(x_r.shape[0]):
            v[c] = x_r[c] * gate[c]
    else:
        v[:] = x_r


# The loops below run over whole arrays, with their branches outside them (a group is a slice of its own): loops over a sub-range of
# indices, range(g0, g0 + group_size), or with a branch inside, vectorised about twice worse (Numba
# must allow for negative indices there; LLVM did not take the branches out).

@njit(**JIT_OPTIONS)
def _forward(x, z, weight, eps, group_size, norm_before_gate, out, r0, r1):
    """Rows r0:r1 of x, out: (rows, d); z: like x, or (0, 0) for no gate."""
    d = x.shape[1]
    v = np.empty(d, x.dtype)          # what is normalised: x, or x * silu(z)
    gate = np.ones(d, x.dtype)        # silu(z), or 1
    no_slope = np.empty(0, x.dtype)
    gated = z.shape[0] > 0
    for r in range(r0, r1):
        x_r, out_r = x[r], out[r]
        if gated:
            _gate(z[r], gate, no_slope)
        _normalised_input(x_r, gate, gated and not norm_before_gate, v)
        for g0 in range(0, d, group_size):
            v_g, out_g = v[g0:g0 + group_size], out_r[g0:g0 + group_size]
            weight_g, gate_g = weight[g0:g0 + group_size], gate[g0:g0 + group_size]
            mean_square = x.dtype.type(0)
            for c in range(group_size):
                mean_square += v_g[c] * v_g[c]
            scale = x.dtype.type(1 / math.sqrt(mean_square / group_size + eps))
            if norm_before_gate:
                for c in range(group_size):
                    out_g[c] = v_g[c] * scale * weight_g[c] * gate_g[c]
            else:
                for c in range(group_size):
                    out_g[c] = v_g[c] * scale * weight_g[c]


@njit(**JIT_OPTIONS)
def _backward(x, z, weight, eps, group_size, norm_before_gate, grad_out, grad_x, grad_z, grad_weight, r0, r1):
    """Gradients of :func:`_forward` for rows r0:r1: grad_x, grad_z (like x, z) written; grad_weight
    (d,) accumulated into."""
    d = x.shape[1]
    v = np.empty(d, x.dtype)          # what is normalised: x, or x * silu(z)
    grad_v = np.empty(d, x.dtype)     # dL/d(normalised input)
    gate = np.ones(d, x.dtype)        # silu(z), or 1
    slope = np.empty(d, x.dtype)      # silu'(z)
    gated = z.shape[0] > 0
    for r in range(r0, r1):
        x_r, g_r = x[r], grad_out[r]
        if gated:
            _gate(z[r], gate, slope)
        _normalised_input(x_r, gate, gated and not norm_before_gate, v)
        for g0 in range(0, d, group_size):
            v_g, g_g, grad_v_g = v[g0:g0 + group_size], g_r[g0:g0 + group_size], grad_v[g0:g0 + group_size]
            weight_g, grad_weight_g = weight[g0:g0 + group_size], grad_weight[g0:g0 + group_size]
            gate_g, slope_g = gate[g0:g0 + group_size], slope[g0:g0 + group_size]
            mean_square = x.dtype.type(0)
            for c in range(group_size):
                mean_square += v_g[c] * v_g[c]
            scale = x.dtype.type(1 / math.sqrt(mean_square / group_size + eps))
            dot = x.dtype.type(0)                      # sum_c dL/dn_c n_c, n = v * scale
            if gated and norm_before_gate:
                grad_z_g = grad_z[r, g0:g0 + group_size]
                for c in range(group_size):
                    normalised = v_g[c] * scale
                    grad_weight_g[c] += g_g[c] * normalised * gate_g[c]
                    grad_z_g[c] = g_g[c] * normalised * weight_g[c] * slope_g[c]
                    grad_v_g[c] = g_g[c] * weight_g[c] * gate_g[c]
                    dot += grad_v_g[c] * normalised
            else:
                for c in range(group_size):
                    normalised = v_g[c] * scale
                    grad_weight_g[c] += g_g[c] * normalised
                    grad_v_g[c] = g_g[c] * weight_g[c]
                    dot += grad_v_g[c] * normalised
            mean_dot = x.dtype.type(dot / group_size)
            for c in range(group_size):
                grad_v_g[c] = scale * (grad_v_g[c] - v_g[c] * scale * mean_dot)
        grad_x_r = grad_x[r]
        if gated and not norm_before_gate:
            grad_z_r = grad_z[r]
            for c in range(d):
                grad_x_r[c] = grad_v[c] * gate[c]
                grad_z_r[c] = grad_v[c] * x_r[c] * slope[c]
        else:
            for c in range(d):
                grad_x_r[c] = grad_v[c]


def _normalise(x, weight, z, eps, group_size, norm_before_gate):
    """The forward kernel on the callers' tensors: the output (rows, d) in the computing dtype, and the
    kernel's inputs (which the backward pass needs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    d = x.shape[-1]
    rows = (as_array(x.reshape(-1, d), dtype),
            torch.empty(0, 0, dtype=dtype) if z is None else as_array(z.reshape(-1, d), dtype),
            as_array(weight, dtype))
    out = empty(rows[0].shape, dtype)
    arrays = [t.numpy() for t in rows]
    out_np = out.numpy()
    run_parts(lambda r0, r1: _forward(*arrays, eps, group_size, norm_before_gate, out_np, r0, r1),
              split(out.shape[0], threads()))
    return out, rows


class _FusedGatedRMSNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        out, rows = _normalise(x, weight, z, eps, group_size, norm_before_gate)
        ctx.save_for_backward(*rows)
        ctx.options = (eps, group_size, norm_before_gate)
        ctx.shapes_and_dtypes = (x.shape, x.dtype, weight.dtype, None if z is None else z.dtype)
        return out.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, z, weight = ctx.saved_tensors
        shape, x_dtype, weight_dtype, z_dtype = ctx.shapes_and_dtypes
        grad_out = as_array(grad_out.reshape(x.shape), x.dtype)
        grad_x, grad_z = empty(x.shape, x.dtype), empty(z.shape, z.dtype)
        arrays = [t.numpy() for t in (x, z, weight)]
        grad_np = [t.numpy() for t in (grad_out, grad_x, grad_z)]

        def rows(r0, r1):  # each thread sums the weight's gradient over its rows
            grad_weight = np.zeros_like(arrays[2])
            _backward(*arrays, *ctx.options, *grad_np, grad_weight, r0, r1)
            return grad_weight

        grad_weight = torch.from_numpy(sum(run_parts(rows, split(x.shape[0], threads()))))
        return (grad_x.reshape(shape).to(x_dtype), grad_weight.to(weight_dtype),
                None if z_dtype is None else grad_z.reshape(shape).to(z_dtype), None, None, None)


def gated_rmsnorm_fused(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Gated RMSNorm by the compiled kernels; arguments and result as
    :func:`recbole_ssm.ops.gated_rmsnorm.gated_rmsnorm` (CPU tensors)."""
    group_size = x.shape[-1] if group_size is None else group_size
    options = (float(eps), int(group_size), bool(norm_before_gate))
    if needs_grad(x, weight, z):
        return _FusedGatedRMSNorm.apply(x, weight, z, *options)
    return _normalise(x, weight, z, *options)[0].reshape(x.shape).to(x.dtype)
