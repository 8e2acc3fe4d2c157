"""Depthwise 1-D convolution over the sequence, causal (Mamba, Mamba-2) or centred (Hydra). Three
implementations of one function:
  - :mod:`.shifted`: pure PyTorch, shifted multiply-adds; the reference;
  - :mod:`.fused`: compiled CPU kernels (Numba), taps, bias and SiLU in one pass;
  - causal-conv1d's CUDA kernel ``causal_conv1d_fn`` (causal, widths 2 to 4): :mod:`.cuda`.
:func:`depthwise_conv1d` picks one per call (see :mod:`recbole_ssm.ops.backend`); on a GPU a centred
convolution runs in PyTorch.
"""
from recbole_ssm.ops.backend import use_compiled, use_cuda
from recbole_ssm.ops.conv import cuda
from recbole_ssm.ops.conv.shifted import depthwise_conv1d_torch


def depthwise_conv1d(x, weight, bias=None, causal=True, activation="silu", backend="auto"):
    """Convolve each channel of ``x`` with its own kernel, then apply ``activation``.

    x: (batch, channels, length); weight: (channels, 1, width) as in ``nn.Conv1d(groups=channels)``;
    bias: (channels,) or None. Causal: output t sees inputs t-width+1 .. t. Centred (odd width):
    output t sees t-width//2 .. t+width//2. Zero padding either way. Returns (batch, channels, length)
    in x's dtype.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r}; use 'silu' or None")
    if causal and use_cuda(backend, cuda.KERNEL, x, lambda: cuda.unmet(x, weight, bias)):
        return cuda.causal_conv1d(x, weight, bias, activation)
    if use_compiled(backend, x):
        from recbole_ssm.ops.conv.fused import depthwise_conv1d_fused

        return depthwise_conv1d_fused(x, weight, bias, causal, activation)
    return depthwise_conv1d_torch(x, weight, bias, causal, activation)


__all__ = ["depthwise_conv1d", "depthwise_conv1d_torch"]
