"""Gated RMSNorm, as used before the output projection of Mamba-2 (Dao & Gu 2024) and Hydra (Hwang et
al. 2024): RMSNorm over groups of features, gated by silu(z) before or after normalising. Three
implementations of one function:
  - :mod:`.grouped`: pure PyTorch, the reference;
  - :mod:`.fused`: compiled CPU kernels (Numba), one pass per row;
  - mamba-ssm's Triton kernel ``rmsnorm_fn``: :mod:`.cuda`.
:func:`gated_rmsnorm` picks one per call (see :mod:`recbole_ssm.ops.backend`).
"""
from recbole_ssm.ops.backend import use_compiled, use_cuda
from recbole_ssm.ops.gated_rmsnorm import cuda
from recbole_ssm.ops.gated_rmsnorm.grouped import gated_rmsnorm_torch

# Under ``auto``, the compiled kernel takes inputs of at least this many elements. Below, PyTorch's
# vectorised operations on data that fits in cache are as fast (one thread, CPU time, rows of 128:
# 200 rows 95 against 98 us forward, 1,600 rows 423 against 505 us); from 3,200 rows the compiled
# single pass wins forward and backward (1.3x-2.0x at 3,200, 2.3x-3.4x at 12,800, 2.8x-3.3x at 102,400
# rows forward and backward), the SSD blocks' compiled path without gradients (:mod:`recbole_ssm.ops.ssd_mixer`)
# calls it whatever the size.
COMPILED_MIN_ELEMENTS = 1 << 19


def gated_rmsnorm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True, backend="auto"):
    """x, z: (..., d); weight: (d,); group_size divides d (None: d).

    norm_before_gate=True:  y = rmsnorm(x) * weight * silu(z);
    norm_before_gate=False: y = rmsnorm(x * silu(z)) * weight.
    Without z, plain RMSNorm. Computed in float32 at least, returned in x's dtype.
    """
    if use_cuda(backend, cuda.KERNEL, x, lambda: cuda.unmet(x, z, group_size)):
        return cuda.gated_rmsnorm(x, weight, z, eps, group_size, norm_before_gate)
    if use_compiled(backend, x) and (backend == "numba" or x.numel() >= COMPILED_MIN_ELEMENTS):
        from recbole_ssm.ops.gated_rmsnorm.fused import gated_rmsnorm_fused

        return gated_rmsnorm_fused(x, weight, z, eps, group_size, norm_before_gate)
    return gated_rmsnorm_torch(x, weight, z, eps, group_size, norm_before_gate)


__all__ = ["gated_rmsnorm", "gated_rmsnorm_torch"]
