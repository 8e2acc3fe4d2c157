"""The depthwise convolution in pure PyTorch, by shifted multiply-adds: the reference, and the path for
what causal-conv1d does not take (centred convolutions, widths other than 2 to 4, float64)."""
import torch
import torch.nn.functional as F


def padding(width, causal):
    """(before, after): the zeros a convolution of ``width`` taps reads around the sequence, causal
    (width - 1 before) or centred (width // 2 on each side; an odd width only)."""
    if causal:
        return width - 1, 0
    if width % 2 == 0:
        raise ValueError(f"a centred convolution needs an odd width, got {width}")
    return width // 2, width // 2


def depthwise_conv1d_torch(x, weight, bias=None, causal=True, activation="silu"):
    """Arguments as :func:`recbole_ssm.ops.conv.depthwise_conv1d`. Returns (batch, channels, length) in
    x's dtype, under autocast too (as causal-conv1d does, whose output has its input's dtype)."""
    length, width = x.shape[-1], weight.shape[-1]
    before, after = padding(width, causal)
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
    return out.transpose(1, 2).to(x.dtype)                               # (b, c, l)
