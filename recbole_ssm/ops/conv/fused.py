"""The depthwise convolution as compiled CPU kernels (Numba): taps, bias and SiLU in one pass over the
channels-last activations, forward and backward.

PyTorch's shifted multiply-adds pay, in the backward pass, for a zero-padded gradient per tap and a
reduction per tap; here each position's channels are one contiguous vector, the pre-activation is
recomputed in the backward pass rather than stored, and the weight and bias gradients are summed per
thread.
"""
import numpy as np
import torch
from numba import njit

from recbole_ssm.ops.autograd import needs_grad
from recbole_ssm.ops.compiled import JIT_OPTIONS, as_array, empty, run_parts, sigmoid, silu_slope, split, threads
from recbole_ssm.ops.conv.shifted import padding


@njit(inline="always", **JIT_OPTIONS)
def _taps_inside(t, before, width, length):
    """The taps k of output position t whose input position t - before + k lies in [0, length), as a
    range's bounds: the kernels' loops then need no test per tap (which made the forward pass 2.5x
    slower at one user, L = 200, 128 channels)."""
    return max(0, before - t), min(width, length + before - t)


@njit(inline="always", **JIT_OPTIONS)
def _preactivation(x_b, taps, bias, before, t, out):
    """out[c] = bias[c] + sum_k taps[k, c] x_b[t - before + k, c], zero outside the sequence."""
    for c in range(out.shape[0]):
        out[c] = bias[c]
    k0, k1 = _taps_inside(t, before, taps.shape[0], x_b.shape[0])
    for k in range(k0, k1):
        x_s, tap = x_b[t - before + k], taps[k]
        for c in range(out.shape[0]):
            out[c] += tap[c] * x_s[c]


@njit(**JIT_OPTIONS)
def _forward(x, taps, bias, before, use_silu, out, b0, b1, t0, t1):
    """Rows b0:b1, output positions t0:t1. x, out: (batch, length, channels); taps: (width, channels);
    bias: (channels,)."""
    for b in range(b0, b1):
        for t in range(t0, t1):
            out_t = out[b, t]
            _preactivation(x[b], taps, bias, before, t, out_t)
            if use_silu:
                for c in range(out_t.shape[0]):
                    out_t[c] *= sigmoid(out_t[c])


@njit(**JIT_OPTIONS)
def _backward(x, taps, bias, before, use_silu, grad_out, grad_x, grad_taps, grad_bias, b0, b1):
    """Gradients of :func:`_forward` for rows b0:b1: grad_x (like x) written; grad_taps (width,
    channels) and grad_bias (channels,) accumulated into."""
    length, channels = x.shape[1], x.shape[2]
    width = taps.shape[0]
    grad_pre = np.empty((length, channels), x.dtype)   # dL/d(pre-activation) of one row
    for b in range(b0, b1):
        for t in range(length):
            g_t, gp_t = grad_out[b, t], grad_pre[t]
            if use_silu:
                _preactivation(x[b], taps, bias, before, t, gp_t)
                for c in range(channels):
                    gp_t[c] = g_t[c] * silu_slope(gp_t[c], sigmoid(gp_t[c]))
            else:
                gp_t[:] = g_t
            for c in range(channels):
                grad_bias[c] += gp_t[c]
            k0, k1 = _taps_inside(t, before, width, length)
            for k in range(k0, k1):
                x_s, gtap = x[b, t - before + k], grad_taps[k]
                for c in range(channels):
                    gtap[c] += gp_t[c] * x_s[c]
        for s in range(length):                        # grad_x[s] = sum_k taps[k] grad_pre[s + before - k]
            gx_s = grad_x[b, s]
            gx_s[:] = 0
            # the taps k whose output position s + before - k lies in [0, length)
            for k in range(max(0, s + before - length + 1), min(width, s + before + 1)):
                gp_t, tap = grad_pre[s + before - k], taps[k]
                for c in range(channels):
                    gx_s[c] += tap[c] * gp_t[c]


def _convolve(x, weight, bias, before, use_silu):
    """The forward kernel on the callers' tensors: the output (b, l, c) in the computing dtype, and the
    kernel's inputs (which the backward pass needs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    channels, width = weight.shape[0], weight.shape[-1]
    inputs = (as_array(x.transpose(1, 2), dtype),                                  # (b, l, c)
              as_array(weight.reshape(channels, width).t(), dtype),               # (width, c)
              torch.zeros(channels, dtype=dtype) if bias is None else as_array(bias, dtype))
    out = empty(inputs[0].shape, dtype)
    arrays = [t.numpy() for t in inputs]
    out_np = out.numpy()
    length = out_np.shape[1]
    run_parts(lambda b0, b1: _forward(*arrays, before, use_silu, out_np, b0, b1, 0, length),
              split(x.shape[0], threads()))
    return out, inputs


class _FusedConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, before, use_silu):
        out, inputs = _convolve(x, weight, bias, before, use_silu)
        ctx.save_for_backward(*inputs)
        ctx.before, ctx.use_silu = before, use_silu
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.weight_shape = weight.shape
        return out.transpose(1, 2).to(x.dtype)                                        # (b, c, l)

    @staticmethod
    def backward(ctx, grad_out):
        x, taps, bias = ctx.saved_tensors
        grad_out = as_array(grad_out.transpose(1, 2), x.dtype)
        grad_x = empty(x.shape, x.dtype)
        arrays = [t.numpy() for t in (x, taps, bias)]
        grad_out_np, grad_x_np = grad_out.numpy(), grad_x.numpy()

        def rows(b0, b1):  # each thread sums the weight and bias gradients over its rows
            grad_taps, grad_bias = np.zeros_like(arrays[1]), np.zeros_like(arrays[2])
            _backward(*arrays, ctx.before, ctx.use_silu, grad_out_np, grad_x_np, grad_taps, grad_bias, b0, b1)
            return grad_taps, grad_bias

        parts = run_parts(rows, split(x.shape[0], threads()))
        grad_taps, grad_bias = (torch.from_numpy(sum(part[i] for part in parts)) for i in range(2))
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (grad_x.transpose(1, 2).to(x_dtype), grad_taps.t().reshape(ctx.weight_shape).to(weight_dtype),
                None if bias_dtype is None else grad_bias.to(bias_dtype), None, None)


def depthwise_conv1d_fused(x, weight, bias=None, causal=True, activation="silu"):
    """The depthwise convolution by the compiled kernels; arguments and result as
    :func:`recbole_ssm.ops.conv.depthwise_conv1d` (CPU tensors; float32, or float64 for float64 x)."""
    before, _ = padding(weight.shape[-1], causal)
    if needs_grad(x, weight, bias):
        return _FusedConv.apply(x, weight, bias, before, activation == "silu")
    return _convolve(x, weight, bias, before, activation == "silu")[0].transpose(1, 2).to(x.dtype)
