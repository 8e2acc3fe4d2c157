"""Stand-ins for the CUDA kernels that recbole-ssm calls, so that the CUDA dispatch runs on the CPU.

:func:`install` puts modules in ``sys.modules`` in place of mamba-ssm's and causal-conv1d's. Each
stand-in kernel checks, at every call, what the real kernel checks or relies on, each precondition
with the source file it comes from (mamba-ssm v2.2.0 to v2.3.2.post1 and main, causal-conv1d v1.4.0
to v1.7.0: identical there), then computes with our pure-PyTorch reference and returns a result of
the real kernel's dtype and memory layout. A broken precondition raises :class:`KernelContractError`.

They model the kernels' contracts, not their arithmetic (TF32 products, bfloat16 states between
chunks): only a real GPU run (tests/gpu, planned by the GPU-readiness issue) can check that. They
compute in the caller's autocast state, as our PyTorch path does, so that the two paths can be
compared exactly. Only the arguments recbole-ssm passes are modelled; any other one is refused.
"""
import sys
import types
from collections import Counter

import torch

from recbole_ssm.ops import backend
from recbole_ssm.ops.conv import depthwise_conv1d_torch
from recbole_ssm.ops.gated_rmsnorm import gated_rmsnorm_torch
from recbole_ssm.ops.selective_scan import selective_scan_torch
from recbole_ssm.ops.ssd import ssd_scan_torch

# The floating types the kernels are built for (selective_scan.cpp, causal_conv1d.cpp:
# DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16 and the input_type checks before it).
HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)

# The compiled extensions, and the Python modules that provide the kernels.
EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
MAMBA_SSM_MODULES = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface",
                     "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined",
                     "mamba_ssm.ops.triton.layernorm_gated")


class KernelContractError(AssertionError):
    """A call that the real kernel would reject, or on which it would compute garbage."""


def require(condition, message):
    if not condition:
        raise KernelContractError(message)


class Calls:
    """What the stand-ins were called with: ``counts[kernel name]``, and ``args[kernel name]``, the
    positional tensors of each call (after the library's own Python-side copies)."""

    def __init__(self):
        self.counts = Counter()
        self.args = {}

    def record(self, name, *tensors):
        self.counts[name] += 1
        self.args.setdefault(name, []).append(tensors)


# ---------------------------------------------------------------- causal-conv1d

def _check_vector_loads(x, channel_last, what):
    """csrc/causal_conv1d_fwd.cu: each thread loads and stores 16 bytes at a time (vec_t of kNElts =
    4 float32 or 8 16-bit elements), unchecked. Channel-last kernel: from x + b * stride(0) +
    l * stride(2) + c. Sequence-major kernel, when length % kNElts == 0 (kIsVecLoad): from
    x + b * stride(0) + c * stride(1). The address must be a multiple of 16 bytes."""
    n_elts = 16 // x.element_size()
    strides = (x.stride(0), x.stride(2)) if channel_last else (x.stride(0), x.stride(1))
    if channel_last or x.shape[2] % n_elts == 0:
        require(x.data_ptr() % 16 == 0 and all(s % n_elts == 0 for s in strides),
                f"causal_conv1d_fwd.cu: {what} must start on 16 bytes with strides {strides} multiples of "
                f"{n_elts} (16-byte vector loads); data_ptr % 16 = {x.data_ptr() % 16}")


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """Stand-in for ``causal_conv1d.causal_conv1d_fn`` (no seq_idx, initial or final states)."""
    # causal_conv1d_interface.py, CausalConv1dFn.forward
    require(activation in (None, "silu", "swish"), "causal_conv1d_interface.py: activation must be None, silu, or swish")
    if x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    CALLS.record("causal_conv1d_fn", x, weight, bias)
    # csrc/causal_conv1d.cpp, causal_conv1d_fwd
    require(x.dtype in HALF_AND_SINGLE and weight.dtype in HALF_AND_SINGLE,
            f"causal_conv1d.cpp: input and weight types must be float32, float16 or bfloat16, got {x.dtype}, {weight.dtype}")
    require(x.dim() == 3 and weight.dim() == 2, "causal_conv1d.cpp: x (batch, dim, seqlen), weight (dim, width)")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    require(weight.shape == (dim, width), f"causal_conv1d.cpp: weight must have shape (dim, width), got {tuple(weight.shape)}")
    require(x.stride(2) == 1 or x.stride(1) == 1, "causal_conv1d.cpp: x.stride(2) == 1 || x.stride(1) == 1")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        require(dim % 8 == 0, f"causal_conv1d.cpp: channel-last needs the channel dimension divisible by 8, got {dim}")
        require(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
                f"causal_conv1d.cpp: channel-last needs x.stride(0) and x.stride(2) multiples of 8, got {x.stride()}")
    require(2 <= width <= 4, f"causal_conv1d.cpp: only supports width between 2 and 4, got {width}")
    if bias is not None:
        require(bias.dtype == weight.dtype, f"causal_conv1d.cpp: bias type {bias.dtype} must be weight's {weight.dtype}")
        require(bias.shape == (dim,), f"causal_conv1d.cpp: bias must have shape (dim,), got {tuple(bias.shape)}")
    _check_vector_loads(x, channel_last, "x")
    result = depthwise_conv1d_torch(x, weight.unsqueeze(1), bias, causal=True,
                                    activation=None if activation is None else "silu")
    # cpp_functions.py (causal_conv1d.cpp before v1.5.1): out = torch.empty_like(x)
    out = torch.empty_like(x).copy_(result)
    if out.requires_grad:
        out.register_hook(lambda dout: _check_conv_dout(dout, channel_last))
    return out


def _check_conv_dout(dout, channel_last):
    """The gradient reaching the backward kernel (CausalConv1dFn.backward, causal_conv1d_bwd)."""
    # causal_conv1d_interface.py, CausalConv1dFn.backward: copies dout where neither stride is 1
    if dout.stride(2) != 1 and dout.stride(1) != 1:
        dout = dout.contiguous()
    # causal_conv1d.cpp, causal_conv1d_bwd: makes dout channel-last where x is and dout.stride(1) != 1 ...
    if channel_last and dout.stride(1) != 1:
        dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
    # ... then checks its strides
    if channel_last:
        require(dout.stride(2) % 8 == 0 and dout.stride(0) % 8 == 0,
                f"causal_conv1d.cpp: channel-last needs dout.stride(0) and dout.stride(2) multiples of 8, got {dout.stride()}")


# ---------------------------------------------------------------- mamba-ssm: selective scan

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Stand-in for ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (real A)."""
    # selective_scan_interface.py, SelectiveScanFn.forward: unit last strides, B and C of 3 dims as one group
    u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    D = D.contiguous() if D is not None else None
    CALLS.record("selective_scan_fn", u, delta, A, B, C, D, z, delta_bias)
    B_groups = B.unsqueeze(1) if B.dim() == 3 else B
    C_groups = C.unsqueeze(1) if C.dim() == 3 else C
    # csrc/selective_scan/selective_scan.cpp, selective_scan_fwd
    require(u.dtype in HALF_AND_SINGLE, f"selective_scan.cpp: input type must be float32, float16 or bfloat16, got {u.dtype}")
    require(A.dtype == torch.float32, f"selective_scan.cpp: A must be float32 (or complex64), got {A.dtype}")
    for name, tensor in (("delta", delta), ("B", B), ("C", C)):  # B, C variable (3 or 4 dims)
        require(tensor.dtype == u.dtype, f"selective_scan.cpp: {name} type {tensor.dtype} must be u's {u.dtype}")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_groups = B_groups.shape[1]
    require(dstate <= 256, f"selective_scan.cpp: selective_scan only supports state dimension <= 256, got {dstate}")
    require(delta.shape == u.shape, f"selective_scan.cpp: delta must have shape {tuple(u.shape)}")
    require(A.shape == (dim, dstate), f"selective_scan.cpp: A must have shape {(dim, dstate)}")
    for name, tensor in (("B", B_groups), ("C", C_groups)):
        require(tensor.shape == (batch, n_groups, dstate, seqlen),
                f"selective_scan.cpp: {name} must have shape {(batch, n_groups, dstate, seqlen)}, got {tuple(tensor.shape)}")
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None:
            require(tensor.dtype == torch.float32 and tensor.shape == (dim,) and tensor.stride(-1) == 1,
                    f"selective_scan.cpp: {name} must be float32 of shape ({dim},) with unit stride")
    if z is not None:
        require(z.dtype == u.dtype and z.shape == u.shape, f"selective_scan.cpp: z must be {u.dtype} of shape {tuple(u.shape)}")
    require(n_groups == 1, "stand-in: recbole-ssm passes B and C with one group")
    y, last_state = selective_scan_torch(u, delta, A, B_groups[:, 0], C_groups[:, 0], D, z, delta_bias,
                                         delta_softplus, return_last_state=True)
    # selective_scan.cpp: out = torch::empty_like(delta), out_z = torch::empty_like(z); the state
    # (x[:, :, -1, 1::2] in selective_scan_interface.py) is in A's dtype
    out = torch.empty_like(delta if z is None else z).copy_(y)
    return (out, last_state.float()) if return_last_state else out


# ---------------------------------------------------------------- mamba-ssm: SSD (Triton)

def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """Stand-in for ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``."""
    require(z is None and dt_bias is None and seq_idx is None and cu_seqlens is None and not dt_softplus
            and dt_limit == (0.0, float("inf")) and not return_varlen_states,
            "stand-in: recbole-ssm passes dt after softplus and bias, and no gate, seq_idx or limits")
    CALLS.record("mamba_chunk_scan_combined", x, dt, A, B, C, D, initial_states)
    # ssd_combined.py, _mamba_chunk_scan_combined_fwd
    require(x.dim() == 4 and B.dim() == 4, "ssd_combined.py: x (batch, seqlen, nheads, headdim), B (batch, seqlen, ngroups, dstate)")
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    require(nheads % ngroups == 0, f"ssd_combined.py: assert nheads % ngroups == 0 ({nheads}, {ngroups})")
    require(B.shape == (batch, seqlen, ngroups, dstate), f"ssd_combined.py: B.shape {tuple(B.shape)}")
    require(dt.shape == (batch, seqlen, nheads), f"ssd_combined.py: dt.shape {tuple(dt.shape)} != {(batch, seqlen, nheads)}")
    require(A.shape == (nheads,), f"ssd_combined.py: A.shape {tuple(A.shape)} != {(nheads,)}")
    require(C.shape == B.shape, f"ssd_combined.py: C.shape {tuple(C.shape)} != B.shape {tuple(B.shape)}")
    if D is not None:
        require(D.shape in ((nheads, headdim), (nheads,)), f"ssd_combined.py: D.shape {tuple(D.shape)}")
    if initial_states is not None:
        require(initial_states.shape == (batch, nheads, headdim, dstate),
                f"ssd_combined.py: initial_states.shape {tuple(initial_states.shape)}")
    # ssd_combined.py: seqlen / chunk_size in math.ceil, chunk_size a Triton constexpr
    require(isinstance(chunk_size, int) and chunk_size > 0, f"ssd_combined.py: chunk_size must be a positive int, got {chunk_size!r}")
    # ssd_bmm.py, _bmm_chunk_fwd: C.B is computed in float16, bfloat16 or else float32 (dot_dtype), so
    # float64 would silently lose precision; tests/ops/triton/test_ssd.py covers these three dtypes only
    for name, tensor in (("x", x), ("dt", dt), ("B", B), ("C", C), ("D", D)):
        require(tensor is None or tensor.dtype in HALF_AND_SINGLE,
                f"ssd_bmm.py / test_ssd.py: {name} is {tensor.dtype if tensor is not None else None}; the kernel computes in float32 at most")
    y, final_states = ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                                     return_final_states=True)
    # ssd_chunk_scan.py, _chunk_scan_fwd: out in x's dtype; ssd_state_passing.py: final states float32
    require(y.dtype == x.dtype, "stand-in: the output must have x's dtype")
    return (y, final_states.float()) if return_final_states else y


# ---------------------------------------------------------------- mamba-ssm: gated RMSNorm (Triton)

def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Stand-in for ``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn``."""
    require(bias is None, "stand-in: recbole-ssm's gated RMSNorm has no bias")
    CALLS.record("rmsnorm_fn", x, weight, z)
    # layernorm_gated.py, LayerNormFn.forward
    if z is not None:
        require(z.shape == x.shape, f"layernorm_gated.py: assert z.shape == x_shape_og ({tuple(z.shape)}, {tuple(x.shape)})")
    # layernorm_gated.py, _layer_norm_fwd
    n = x.shape[-1]
    group_size = n if group_size is None else group_size
    require(n % group_size == 0, f"layernorm_gated.py: assert N % group_size == 0 ({n}, {group_size})")
    require(weight.shape == (n,), f"layernorm_gated.py: assert weight.shape == (N,), got {tuple(weight.shape)}")
    require(group_size <= 65536 // x.element_size(), "layernorm_gated.py: This layer norm doesn't support feature dim >= 64KB.")
    # _layer_norm_fwd_1pass_kernel loads x and z .to(tl.float32): float64 would be computed in float32
    require(x.dtype in HALF_AND_SINGLE, f"layernorm_gated.py: x is {x.dtype}; the kernel computes in float32")
    y = gated_rmsnorm_torch(x, weight, z, eps, group_size, norm_before_gate)
    return torch.empty_like(x).copy_(y)  # _layer_norm_fwd: out = torch.empty_like(x), in x's dtype


# ---------------------------------------------------------------- installation

CALLS = Calls()

_FUNCTIONS = {
    "causal_conv1d": {"causal_conv1d_fn": causal_conv1d_fn},
    "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": selective_scan_fn},
    "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": mamba_chunk_scan_combined},
    "mamba_ssm.ops.triton.layernorm_gated": {"rmsnorm_fn": rmsnorm_fn},
}


def install(monkeypatch, absent=()):
    """Install the stand-ins (and empty modules standing for the compiled extensions) in
    ``sys.modules``, present CPU tensors to the dispatch as CUDA ones, and reset the dispatch's
    caches. Modules named in ``absent`` fail to import. Returns a fresh :class:`Calls`."""
    global CALLS
    CALLS = Calls()
    for name in (*MAMBA_SSM_MODULES, *EXTENSIONS, "causal_conv1d"):
        module = types.ModuleType(name)
        for attribute, function in _FUNCTIONS.get(name, {}).items():
            setattr(module, attribute, function)
        monkeypatch.setitem(sys.modules, name, None if name in absent else module)
    monkeypatch.setattr(backend, "device_type", lambda tensor: "cuda" if tensor.device.type == "cpu" else tensor.device.type)
    monkeypatch.setattr(backend, "cuda_device_available", lambda: True)
    reset_caches()
    return CALLS


def reset_caches():
    """Forget the kernels the dispatch loaded and the warnings it gave."""
    backend._load.cache_clear()
    backend._warn_once.cache_clear()
