"""mamba-ssm's Triton SSD kernel ``mamba_chunk_scan_combined`` and what it requires of its arguments.

Sources, mamba-ssm v2.2.0 to v2.3.2.post1 and main: mamba_ssm/ops/triton/ssd_combined.py
(``_mamba_chunk_scan_combined_fwd`` asserts the shapes that :func:`check_shapes` checks, and copies
B, C and x to a layout it takes) and mamba_ssm/ops/triton/ssd_bmm.py (``_bmm_chunk_fwd`` forms C.B
in float32 for every input dtype other than float16 / bfloat16, so float64 inputs would silently be
computed in float32; mamba-ssm tests the kernel in float32, float16 and bfloat16 only).
In releases up to v2.3.2.post1, importing anything from ``mamba_ssm`` runs ``mamba_ssm/__init__.py``,
which imports ``selective_scan_interface`` and with it the compiled ``selective_scan_cuda``: without
that extension this Triton kernel does not import either (on main it does).
"""
from recbole_ssm.ops.backend import CudaKernel, dtype_unmet
from recbole_ssm.ops.ssd.chunked import check_shapes

KERNEL = CudaKernel(op="the SSD scan", module="mamba_ssm.ops.triton.ssd_combined",
                    name="mamba_chunk_scan_combined", package="mamba-ssm")


def unmet(x, dt, B, C, D):
    """The first requirement of ``mamba_chunk_scan_combined`` that these arguments do not meet, as a
    sentence; or None. Shapes are the op's own contract (:func:`check_shapes`)."""
    return dtype_unmet(x=x, dt=dt, B=B, C=C, D=D)


def ssd_scan(x, dt, A, B, C, chunk_size, D, initial_states, return_final_states):
    """``mamba_chunk_scan_combined`` on arguments that meet its requirements (see :func:`unmet`); the
    shapes are checked first, with our error messages."""
    check_shapes(x, dt, A, B, C, chunk_size)
    return KERNEL.load()(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                         return_final_states=return_final_states)
