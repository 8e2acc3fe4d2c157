"""Depthwise 1-D convolution over the sequence, causal (Mamba, Mamba-2) or centred (Hydra)."""
import torch
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
        before, after = width - 1, 0
    else:
        if width % 2 == 0:
            raise ValueError(f"a centred convolution needs an odd width, got {width}")
        before = after = width // 2
    # Channels last, (batch, length, channels): the layout our blocks' projections produce, so the
    # transposes are free, and every tap reads a contiguous run.
    padded = F.pad(x.transpose(1, 2), (0, 0, before, after))            # (b, l + width - 1, c)
    taps = weight[:, 0].t()                                              # (width, c)
    out = padded[:, :length] * taps[0]
    for k in range(1, width):
        out = torch.addcmul(out, padded[:, k:k + length], taps[k])
    if bias is not None:
        out = out + bias
    out = F.silu(out) if activation == "silu" else out
    return out.transpose(1, 2)                                           # (b, c, l)
