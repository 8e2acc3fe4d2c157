"""Gated RMSNorm, as mamba-ssm's ``RMSNormGated`` (``mamba_ssm.ops.triton.layernorm_gated.RMSNorm``).

Used before the output projection of Mamba-2 (Dao & Gu 2024) and Hydra (Hwang et al. 2024). Same
parameter (``weight``, (d,)) and options, so checkpoints move between the two.
"""
import torch
import torch.nn as nn

from recbole_ssm.ops.backend import check_backend
from recbole_ssm.ops.gated_rmsnorm import gated_rmsnorm


class RMSNormGated(nn.Module):
    """RMSNorm over groups of ``group_size`` features (all ``d`` when None), gated by silu(z).

    norm_before_gate=True:  y = rmsnorm(x) * weight * silu(z);
    norm_before_gate=False: y = rmsnorm(x * silu(z)) * weight.
    Without z, plain RMSNorm. Computed in float32 at least, returned in x's dtype.
    """

    def __init__(self, d, eps=1e-5, group_size=None, norm_before_gate=True, backend="auto"):
        super().__init__()
        group_size = d if group_size is None else group_size
        if d % group_size != 0:
            raise ValueError(f"group_size ({group_size}) must divide the normalised size ({d})")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, z=None):
        """x, z: (..., d). Returns (..., d)."""
        return gated_rmsnorm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate, self.backend)

    def extra_repr(self):
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
