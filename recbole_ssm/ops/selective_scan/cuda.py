"""mamba-ssm's fused selective scan (CUDA) and what it requires of its arguments.

Sources, identical in mamba-ssm v2.2.0 to v2.3.2.post1 and on main (after v2.3.2.post1):
  - mamba_ssm/ops/selective_scan_interface.py, ``SelectiveScanFn.forward``: copies u, delta, B, C
    and z to a unit last stride, and B, C of 3 dimensions (batch, n, length) become one group;
  - csrc/selective_scan/selective_scan.cpp, ``selective_scan_fwd``: the checks in :func:`unmet`.
In releases up to v2.3.2.post1 ``selective_scan_interface`` imports the compiled extension
``selective_scan_cuda`` unconditionally; on main (PR #977) the extension is built only on request and
its absence is tolerated until ``selective_scan_fn`` is called, hence the extension check.
"""
import torch

from recbole_ssm.ops.backend import CudaKernel, dtype_unmet

KERNEL = CudaKernel(
    op="the selective scan", module="mamba_ssm.ops.selective_scan_interface", name="selective_scan_fn",
    package="mamba-ssm", extension="selective_scan_cuda",
    missing_extension_hint="mamba-ssm was built without it (its main branch builds it only with "
                           "MAMBA_KEEP_CUDA_BUILD=TRUE); install a release from recbole-ssm[cuda]",
)

# selective_scan.cpp: TORCH_CHECK(dstate <= 256, "selective_scan only supports state dimension <= 256")
MAX_D_STATE = 256


def unmet(u, delta, A, B, C, D, z, delta_bias, initial_state=None):
    """The first requirement of ``selective_scan_fn`` (selective_scan.cpp) that these arguments do not
    meet, as a sentence; or None. Shapes are the op's own contract, not checked here."""
    if initial_state is not None:  # selective_scan_interface.py: no initial-state argument in any version
        return "an initial state was given; the kernel always starts from zeros"
    reason = dtype_unmet(u=u)
    if reason is not None:
        return reason
    for name, tensor in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if tensor is not None and tensor.dtype != u.dtype:
            return f"{name} is {tensor.dtype} and u is {u.dtype}; the kernel needs them in one dtype"
    for name, tensor in (("A", A), ("D", D), ("delta_bias", delta_bias)):
        if tensor is not None and tensor.dtype != torch.float32:
            return f"{name} is {tensor.dtype}; the kernel needs it in float32"
    if A.shape[-1] > MAX_D_STATE:
        return f"d_state is {A.shape[-1]}; the kernel supports at most {MAX_D_STATE}"
    return None


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """``selective_scan_fn`` on arguments that meet its requirements (see :func:`unmet`)."""
    return KERNEL.load()(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                         return_last_state=return_last_state)
