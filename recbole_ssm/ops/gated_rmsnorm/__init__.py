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
# vectorised operations on data that fits in cache are faster (python -m benchmarks.kernels, one
# thread: 0.7x-0.8x at 8 x 200 x 128 and 1 x 2000 x 128 elements, forward and backward); above, the
# compiled single pass wins (2.4x-2.7x forward at 256 x 200 x 128 and 2048 x 50 x 128).
COMPILED_MIN_ELEMENTS = 1 << 21


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
