"""causal-conv1d's CUDA kernel ``causal_conv1d_fn``, what it requires of its arguments, and the copy
that puts ``x`` in a layout it reads.

Sources, identical in causal-conv1d v1.4.0 to v1.7.0:
  - csrc/causal_conv1d.cpp, ``causal_conv1d_fwd`` / ``causal_conv1d_bwd``: x, weight in float32,
    float16 or bfloat16, bias in weight's dtype, width 2 to 4; x.stride(2) == 1 or x.stride(1) == 1,
    and a channel-last x (stride(1) == 1, stride(2) > 1) needs dim, x.stride(0) and x.stride(2)
    multiples of 8;
  - csrc/causal_conv1d_fwd.cu: every thread moves 16 bytes at a time (``vec_t`` of kNElts elements:
    4 in float32, 8 in 16-bit types), unchecked: in the channel-last kernel from x + b * stride(0) +
    l * stride(2) + c, and in the sequence-major kernel (when length % kNElts == 0) from
    x + b * stride(0) + c * stride(1). So x's data must start on 16 bytes, and those strides be
    multiples of kNElts, or the loads fault;
  - the output is ``torch.empty_like(x)``, in x's dtype (causal_conv1d.cpp up to v1.5.0,
    causal_conv1d/cpp_functions.py from v1.5.1). Importing ``causal_conv1d`` imports the compiled
    ``causal_conv1d_cuda`` (causal_conv1d_interface.py, from v1.5.1 cpp_functions.py), so a missing
    extension fails the import; the loader checks the extension all the same.
"""
import torch

from recbole_ssm.ops.backend import CudaKernel, dtype_unmet

KERNEL = CudaKernel(op="the causal convolution", module="causal_conv1d", name="causal_conv1d_fn",
                    package="causal-conv1d", extension="causal_conv1d_cuda")

WIDTHS = (2, 3, 4)
CHANNEL_LAST_MULTIPLE = 8
VECTOR_BYTES = 16


def unmet(x, weight, bias):
    """The first requirement of ``causal_conv1d_fn`` that these arguments do not meet, as a sentence; or
    None. x's layout is not one: :func:`causal_conv1d` copies x where the kernel cannot read it."""
    reason = dtype_unmet(x=x, weight=weight)
    if reason is not None:
        return reason
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias is {bias.dtype} and weight is {weight.dtype}; the kernel needs them in one dtype"
    if weight.shape[-1] not in WIDTHS:
        return f"the convolution width (d_conv) is {weight.shape[-1]}; the kernel supports 2 to 4"
    return None


def readable_in_place(x):
    """Whether the kernel reads x (batch, dim, length) as it is laid out: channel-last with the strides
    causal_conv1d.cpp requires, or sequence-major and contiguous; either way 16-byte aligned."""
    if x.data_ptr() % VECTOR_BYTES:
        return False
    if x.stride(1) == 1 and x.stride(2) > 1:  # the kernel's own test for channel-last
        return all(n % CHANNEL_LAST_MULTIPLE == 0 for n in (x.shape[1], x.stride(0), x.stride(2)))
    return x.is_contiguous()


def kernel_layout(x):
    """x itself where the kernel reads it in place, else a copy: channel-last where dim is a multiple
    of 8 (the layout our blocks use next), else sequence-major."""
    if readable_in_place(x):
        return x
    if x.shape[1] % CHANNEL_LAST_MULTIPLE == 0:
        return x.transpose(1, 2).clone(memory_format=torch.contiguous_format).transpose(1, 2)
    return x.clone(memory_format=torch.contiguous_format)


def causal_conv1d(x, weight, bias, activation):
    """``causal_conv1d_fn`` on arguments that meet its requirements (see :func:`unmet`); x: (batch, dim,
    length), weight: (dim, 1, width) as nn.Conv1d's."""
    return KERNEL.load()(kernel_layout(x), weight.squeeze(1), bias, activation=activation)
