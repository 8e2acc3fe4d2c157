"""Gated RMSNorm in pure PyTorch: the reference."""
import torch
import torch.nn.functional as F


def gated_rmsnorm_torch(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Arguments and result as :func:`recbole_ssm.ops.gated_rmsnorm.gated_rmsnorm`."""
    group_size = x.shape[-1] if group_size is None else group_size
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    gate = None if z is None else F.silu(z.to(dtype))
    if gate is not None and not norm_before_gate:
        y = y * gate
    groups = y.unflatten(-1, (-1, group_size))  # (..., d // group_size, group_size)
    y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    y = y * weight.to(dtype)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)
