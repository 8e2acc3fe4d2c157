"""Mamba-1 selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv 2312.00752). For every channel d and state n the recurrence is

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,     y_t = <h_t, C_t> + D * u_t,

with an optional output gate y_t * silu(z_t). Three implementations of one function:
  - :mod:`.chunked`: pure PyTorch, the reference (a chunked scan for training, an in-place
    recurrence for inference);
  - :mod:`.fused_recurrent`: compiled CPU kernels (Numba);
  - mamba-ssm's CUDA kernel ``selective_scan_fn``.
:func:`selective_scan` picks one per call (see :mod:`recbole_ssm.ops.backend`).
"""
from recbole_ssm.ops.backend import use_compiled, use_cuda
from recbole_ssm.ops.selective_scan import cuda
from recbole_ssm.ops.selective_scan.chunked import selective_scan_torch


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, backend="auto"):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature and layout.

    u, delta, z: (batch, d, length); A: (d, n); B, C: (batch, n, length); D, delta_bias: (d,);
    initial_state: the state before the first position, (batch, d, n), zeros when None.
    Returns y: (batch, d, length) in u's dtype, and with ``return_last_state`` also the state after
    the last position, (batch, d, n) (not differentiable).
    """
    if use_cuda(backend, cuda.KERNEL, u, lambda: cuda.unmet(u, delta, A, B, C, D, z, delta_bias, initial_state)):
        return cuda.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if use_compiled(backend, u):
        from recbole_ssm.ops.selective_scan.fused_recurrent import selective_scan_fused

        return selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                    return_last_state)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                return_last_state)


__all__ = ["selective_scan", "selective_scan_torch"]
