"""The SSD scan of Mamba-2 (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", ICML 2024): a selective SSM with a scalar decay per
head. For each head, with state h_t (headdim, d_state):

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,        y_t = h_t C_t + D x_t.

Three implementations of one function:
  - :mod:`.chunked`: pure PyTorch by chunks of matrix products, the reference;
  - :mod:`.fused_recurrent`: compiled CPU kernels (Numba), the recurrence position by position;
  - mamba-ssm's Triton kernel ``mamba_chunk_scan_combined``.
:func:`ssd_scan` picks one per call (see :mod:`recbole_ssm.ops.backend`).
"""
from recbole_ssm.ops.positions import at_positions, check_positions
from recbole_ssm.ops.backend import use_compiled, use_cuda
from recbole_ssm.ops.ssd import cuda
from recbole_ssm.ops.ssd.chunked import check_shapes, ssd_scan_torch


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False, mask=None,
             positions=None, backend="auto"):
    """The SSD scan.

    Arguments as in :func:`ssd_scan_torch`, plus ``mask`` (b, l) bool or None: True marks a real
    position. Masked positions get dt = 0 and x = 0 (no state change, no contribution) and y = 0.
    ``positions`` (b,) or None: y at those positions only, (b, h, p) (not with ``return_final_states``);
    the compiled kernels then scan each row up to its position only, the other implementations compute
    every position. ``backend``: see :mod:`recbole_ssm.ops.backend`.
    """
    if positions is not None:
        check_positions(positions, x.shape[0], x.shape[1])
        if return_final_states:
            raise ValueError("ssd_scan: positions and return_final_states cannot be combined (the final "
                             "states are those after the whole sequence)")
    if use_compiled(backend, x):
        # On a CPU the compiled recurrence beats the chunked matrix products at every shape measured
        # (python -m benchmarks.kernels at 9b5804b: 1.8x to 6.0x, forward and forward + backward,
        # batch x length 2048 x 50, 256 x 200, 8 x 200, 8 x 2000, 1 x 2000): PyTorch's chunked form
        # pays for many small operations and for padding to whole chunks. It skips padded positions itself.
        from recbole_ssm.ops.ssd.fused_recurrent import ssd_scan_fused

        check_shapes(x, dt, A, B, C, chunk_size)
        return ssd_scan_fused(x, dt, A, B, C, D=D, initial_states=initial_states,
                              return_final_states=return_final_states, mask=mask, positions=positions)
    if mask is not None:
        x = x.masked_fill(~mask[..., None, None], 0)
        dt = dt.masked_fill(~mask[..., None], 0)
    if use_cuda(backend, cuda.KERNEL, x, lambda: cuda.unmet(x, dt, B, C, D)):
        out = cuda.ssd_scan(x, dt, A, B, C, chunk_size, D, initial_states, return_final_states)
    else:
        out = ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                             return_final_states=return_final_states)
    y, final_states = out if return_final_states else (out, None)
    if mask is not None:
        y = y.masked_fill(~mask[..., None, None], 0)
    if positions is not None:
        return at_positions(y, positions)
    return (y, final_states) if return_final_states else y


__all__ = ["ssd_scan", "ssd_scan_torch"]
