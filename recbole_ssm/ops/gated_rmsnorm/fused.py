"""Gated RMSNorm as compiled CPU kernels (Numba): gate, normalisation and weight in one pass per row,
forward and backward (PyTorch's version is eight elementwise operations forward and about twice as
many backward, each over the whole (batch, length, d) activation)."""
import math

import numpy as np
import torch
from numba import njit

from recbole_ssm.ops.autograd import needs_grad
from recbole_ssm.ops.compiled import JIT_OPTIONS, exp32, run_parts, split, threads


@njit(**JIT_OPTIONS)
def _forward(x, z, weight, eps, group_size, norm_before_gate, out, r0, r1):
    """Rows r0:r1 of x, out: (rows, d); z: like x, or (0, 0) for no gate."""
    d = x.shape[1]
    v = np.empty(d, x.dtype)
    for r in range(r0, r1):
        x_r, out_r = x[r], out[r]
        gated = z.shape[0] > 0
        for c in range(d):
            v[c] = x_r[c]
            if gated and not norm_before_gate:
                v[c] *= z[r, c] / (1 + exp32(-z[r, c]))
        for g0 in range(0, d, group_size):
            mean_square = x.dtype.type(0)
            for c in range(g0, g0 + group_size):
                mean_square += v[c] * v[c]
            scale = 1 / math.sqrt(mean_square / group_size + eps)
            for c in range(g0, g0 + group_size):
                out_r[c] = v[c] * scale * weight[c]
                if gated and norm_before_gate:
                    out_r[c] *= z[r, c] / (1 + exp32(-z[r, c]))


@njit(**JIT_OPTIONS)
def _backward(x, z, weight, eps, group_size, norm_before_gate, grad_out, grad_x, grad_z, grad_weight, r0, r1):
    """Gradients of :func:`_forward` for rows r0:r1: grad_x, grad_z (like x, z) written; grad_weight
    (d,) accumulated into."""
    d = x.shape[1]
    v = np.empty(d, x.dtype)          # what is normalised: x, or x * silu(z)
    grad_v = np.empty(d, x.dtype)     # dL/d(normalised input), before the group correction
    gate = np.empty(d, x.dtype)       # silu(z)
    slope = np.empty(d, x.dtype)      # silu'(z)
    gated = z.shape[0] > 0
    for r in range(r0, r1):
        x_r, g_r = x[r], grad_out[r]
        for c in range(d):
            if gated:
                sig = 1 / (1 + exp32(-z[r, c]))
                gate[c] = z[r, c] * sig
                slope[c] = sig * (1 + z[r, c] * (1 - sig))
            else:
                gate[c] = 1
            v[c] = x_r[c] * gate[c] if gated and not norm_before_gate else x_r[c]
        for g0 in range(0, d, group_size):
            mean_square = x.dtype.type(0)
            for c in range(g0, g0 + group_size):
                mean_square += v[c] * v[c]
            scale = 1 / math.sqrt(mean_square / group_size + eps)
            dot = x.dtype.type(0)                      # sum_c dL/dn_c n_c, n = v * scale
            for c in range(g0, g0 + group_size):
                normalised = v[c] * scale
                grad_n = g_r[c] * weight[c]
                if gated and norm_before_gate:
                    grad_weight[c] += g_r[c] * normalised * gate[c]
                    grad_z[r, c] = g_r[c] * normalised * weight[c] * slope[c]
                    grad_n *= gate[c]
                else:
                    grad_weight[c] += g_r[c] * normalised
                grad_v[c] = grad_n
                dot += grad_n * normalised
            dot /= group_size
            for c in range(g0, g0 + group_size):
                grad_v[c] = scale * (grad_v[c] - v[c] * scale * dot)
        for c in range(d):
            if gated and not norm_before_gate:
                grad_x[r, c] = grad_v[c] * gate[c]
                grad_z[r, c] = grad_v[c] * x_r[c] * slope[c]
            else:
                grad_x[r, c] = grad_v[c]


def _normalise(x, weight, z, eps, group_size, norm_before_gate):
    """The forward kernel on the callers' tensors: the output (rows, d) in the computing dtype, and the
    kernel's inputs (which the backward pass needs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    d = x.shape[-1]
    rows = (x.detach().to(dtype).reshape(-1, d).contiguous(),
            torch.empty(0, 0, dtype=dtype) if z is None else z.detach().to(dtype).reshape(-1, d).contiguous(),
            weight.detach().to(dtype).contiguous())
    out = torch.empty_like(rows[0])
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
        grad_out = grad_out.to(x.dtype).reshape(x.shape).contiguous()
        grad_x, grad_z = torch.empty_like(x), torch.empty_like(z)
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
