"""Depthwise 1-D convolution over the sequence, causal (Mamba, Mamba-2) or centred (Hydra)."""
import torch.nn.functional as F

from recbole_ssm.ops.backend import cuda_kernel


def depthwise_conv1d(x, weight, bias=None, causal=True, activation="silu", backend="auto"):
    """Convolve each channel of ``x`` with its own kernel, then apply ``activation``.

    x: (batch, channels, length); weight: (channels, 1, width) as in ``nn.Conv1d(groups=channels)``;
    bias: (channels,) or None. Causal: output t sees inputs t-width+1 .. t. Centred (odd width):
    output t sees t-width//2 .. t+width//2. Zero padding either way. Returns (batch, channels, length).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r}; use 'silu' or None")
    length, width = x.shape[-1], weight.shape[-1]
    if causal:
        fused = cuda_kernel(backend, x, "causal_conv1d", "causal_conv1d_fn")
        if fused is not None:
            return fused(x, weight.squeeze(1), bias, activation=activation)
        padded = F.pad(x, (width - 1, 0))
    else:
        if width % 2 == 0:
            raise ValueError(f"a centred convolution needs an odd width, got {width}")
        padded = F.pad(x, (width // 2, width // 2))
    out = _shifted_sum(padded, weight[:, 0], length)
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out) if activation == "silu" else out


def _shifted_sum(padded, taps, length):
    """sum_k taps[:, k] * padded[..., k:k+length]: a depthwise convolution as `width` multiply-adds,
    much faster on CPU than a grouped ``F.conv1d`` for the small widths used here."""
    out = padded[..., :length] * taps[:, :1]
    for k in range(1, taps.shape[1]):
        out = out + padded[..., k:k + length] * taps[:, k:k + 1]
    return out
