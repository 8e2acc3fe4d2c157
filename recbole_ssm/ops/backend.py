"""Choice between the implementations of each op: pure PyTorch, the compiled CPU kernels (Numba), and
the fused CUDA kernels of mamba-ssm / causal-conv1d.

``backend`` is one of:
  - ``"auto"``  (default): on CUDA tensors the fused CUDA kernel where it loads and takes the given
                 tensors, else PyTorch, with one warning per reason (the kernel missing, or a
                 requirement the tensors do not meet: a dtype, a width, a state size); on CPU tensors
                 the compiled kernels (if Numba cannot load, PyTorch, with one warning that says why);
  - ``"torch"``: always the pure-PyTorch implementation (the reference);
  - ``"numba"``: the compiled CPU kernels; an error if the tensors are not on the CPU or Numba cannot
                 load;
  - ``"cuda"``:  the fused CUDA kernels; an error if the tensors are not on CUDA, the kernel did not
                 load, or it cannot take the given tensors (the message names the requirement).
The decision is made per call: each op's ``cuda.py`` states its kernel's requirements, with the
library source they come from, and lays out its tensors the way the kernel takes them. Ops without a
compiled or CUDA kernel (Hydra's centred convolution) run in PyTorch under every backend. All
implementations compute the same function with the same parameters, so a checkpoint moves freely
between them.
"""
import importlib
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("auto", "torch", "numba", "cuda")

# The input dtypes of the fused kernels. selective_scan.cpp and causal_conv1d.cpp dispatch on exactly
# these and reject the rest; the Triton kernels (SSD, gated RMSNorm) would compute float64 in float32.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend(backend):
    """Validate a backend name, with an error that lists the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown ssm backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def device_type(tensor):
    """``tensor``'s device type ("cpu", "cuda", ...): the one device check of the dispatch, which the
    contract tests replace to present CPU tensors as CUDA ones."""
    return tensor.device.type


def cuda_device_available():
    """Whether PyTorch sees a CUDA device; replaced by the contract tests along with :func:`device_type`."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class CudaKernel:
    """A fused CUDA kernel: the function ``module.name`` from the pip distribution ``package``. It is
    usable only where its compiled ``extension`` module (if named) imports as well: a Python module
    may import without it and fail only when called."""
    op: str                 # our op, for messages
    module: str
    name: str
    package: str
    extension: str | None = None
    missing_extension_hint: str = ""

    def load(self):
        """The kernel function; an error if it cannot load."""
        function, reason = _load(self)
        if function is None:
            raise RuntimeError(reason)
        return function


@lru_cache(maxsize=None)
def _load(kernel):
    """(the kernel function, None), or (None, why it cannot load): imported once."""
    install = f"install recbole-ssm[cuda] ({kernel.package}) on a machine with CUDA (README, 'GPU install')"
    try:
        function = getattr(importlib.import_module(kernel.module), kernel.name)
    except Exception as error:  # ImportError, or a broken build (OSError: undefined symbols, ...)
        return None, f"{kernel.module}.{kernel.name} did not import ({type(error).__name__}: {error}); {install}"
    if kernel.extension is not None:
        try:
            importlib.import_module(kernel.extension)
        except Exception as error:
            return None, (f"{kernel.module} imports, but its compiled extension {kernel.extension} does not "
                          f"({type(error).__name__}: {error}); {kernel.missing_extension_hint or install}")
    return function, None


def use_cuda(backend, kernel, tensor, unmet):
    """Whether the fused ``kernel`` runs an op on ``tensor`` under ``backend``.

    ``unmet()`` names the first of the kernel's requirements that the op's arguments do not meet (a
    sentence), or returns None; it is called only where the kernel would otherwise run. Under "auto" a
    missing kernel or an unmet requirement means PyTorch, with one warning per reason; under "cuda"
    it is an error that says which.
    """
    check_backend(backend)
    if backend not in ("auto", "cuda"):
        return False
    if device_type(tensor) != "cuda":
        if backend == "cuda":
            raise RuntimeError(f"ssm backend 'cuda' needs CUDA tensors, got a tensor on {tensor.device}")
        return False
    return _available(_load(kernel)[1] or unmet(), backend == "cuda",
                      f"ssm backend 'cuda' cannot run {kernel.op} with {kernel.name}",
                      f"recbole-ssm: {kernel.op} runs in PyTorch on the GPU (slower), not with {kernel.name}")


def dtype_unmet(**tensors):
    """Which of ``tensors`` (None allowed) has a dtype the fused kernels do not take, as a sentence; or None."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in KERNEL_DTYPES:
            return f"{name} is {tensor.dtype}; the kernel takes float32, float16 or bfloat16"
    return None


@lru_cache(maxsize=None)
def compiled_unavailable():
    """Why the compiled CPU kernels cannot load (a sentence), or ``None`` when they can."""
    try:
        importlib.import_module("recbole_ssm.ops.compiled")
    except Exception as error:  # ImportError, or a broken Numba / llvmlite install
        return f"Numba could not be loaded ({type(error).__name__}: {error}); install it with 'pip install numba'"
    return None


def use_compiled(backend, tensor):
    """Whether the compiled CPU kernels run an op on ``tensor`` under ``backend``."""
    check_backend(backend)
    if backend not in ("auto", "numba") or device_type(tensor) != "cpu":
        if backend == "numba":
            raise RuntimeError(f"ssm backend 'numba' runs on the CPU, got a tensor on {tensor.device}")
        return False
    return _available(compiled_unavailable(), backend == "numba", "ssm backend 'numba' is not available",
                      "recbole-ssm: the compiled CPU kernels are not available, using the slower PyTorch "
                      "implementation")


def use_compiled_without_gradients(backend, x, module):
    """Whether a block runs its one-call compiled path (:mod:`recbole_ssm.ops.ssd_mixer`,
    :mod:`recbole_ssm.ops.selective_mixer`) for its activation ``x``: the compiled kernels for this CPU
    tensor under ``backend``, and no gradient to compute, through ``x`` nor ``module``'s parameters."""
    if not use_compiled(backend, x):
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _available(reason, required, error, warning):
    """True where there is no ``reason`` against a kernel; else, when the backend ``required`` it, an
    error, otherwise ``warning`` once for this reason, and False."""
    if reason is None:
        return True
    if required:
        raise RuntimeError(f"{error}: {reason}")
    _warn_once(f"{warning}: {reason}")
    return False


@lru_cache(maxsize=None)
def _warn_once(message):
    warnings.warn(message, RuntimeWarning, stacklevel=3)
