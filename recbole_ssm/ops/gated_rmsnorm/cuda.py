"""mamba-ssm's Triton gated RMSNorm ``rmsnorm_fn`` and what it requires of its arguments.

Source, identical in mamba-ssm v2.2.0 to v2.3.2.post1 and main: mamba_ssm/ops/triton/layernorm_gated.py.
``LayerNormFn.forward`` flattens x and z to rows and copies them to a unit last stride, and asserts
z.shape == x.shape; ``_layer_norm_fwd`` asserts d % group_size == 0 and weight.shape == (d,), and
raises for a group of more than 64 KB (group_size > 65536 // x.element_size()); the kernel loads
x and z as float32 (float64 would be computed in float32) and writes ``torch.empty_like(x)``, in x's
dtype. Importing it runs ``mamba_ssm/__init__.py``, which in releases up to v2.3.2.post1 needs the
compiled ``selective_scan_cuda`` (see :mod:`recbole_ssm.ops.ssd.cuda`).
"""
from recbole_ssm.ops.backend import CudaKernel, dtype_unmet

KERNEL = CudaKernel(op="the gated RMSNorm", module="mamba_ssm.ops.triton.layernorm_gated", name="rmsnorm_fn",
                    package="mamba-ssm")

MAX_GROUP_BYTES = 65536


def unmet(x, z, group_size):
    """The first requirement of ``rmsnorm_fn`` that these arguments do not meet, as a sentence; or None."""
    reason = dtype_unmet(x=x, z=z)
    if reason is not None:
        return reason
    group_size = x.shape[-1] if group_size is None else group_size
    if group_size * x.element_size() > MAX_GROUP_BYTES:
        return f"a group of {group_size} {x.dtype} features exceeds the kernel's {MAX_GROUP_BYTES} bytes"
    return None


def gated_rmsnorm(x, weight, z, eps, group_size, norm_before_gate):
    """``rmsnorm_fn`` (no bias) on arguments that meet its requirements (see :func:`unmet`)."""
    return KERNEL.load()(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
