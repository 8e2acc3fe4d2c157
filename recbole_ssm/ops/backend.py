"""Choice between the implementations of each op: pure PyTorch, the compiled CPU kernels (Numba), and
the fused CUDA kernels of mamba-ssm / causal-conv1d.

``backend`` is one of:
  - ``"auto"``  (default): on CUDA tensors the fused CUDA kernels when the package imports, else
                 PyTorch; on CPU tensors the compiled kernels (if Numba cannot load, PyTorch, with one
                 warning that says why);
  - ``"torch"``: always the pure-PyTorch implementation (the reference);
  - ``"numba"``: the compiled CPU kernels; an error if the tensors are not on the CPU or Numba cannot
                 load;
  - ``"cuda"``:  the fused CUDA kernels; an error if the tensors are not on CUDA or the package is
                 missing.
Ops without a compiled or CUDA kernel run in PyTorch under every backend. All implementations compute
the same function with the same parameters, so a checkpoint moves freely between them.
"""
import importlib
import warnings
from functools import lru_cache

BACKENDS = ("auto", "torch", "numba", "cuda")

# Which pip distribution provides each kernel module, for error messages.
_PROVIDER = {
    "mamba_ssm": "mamba-ssm",
    "causal_conv1d": "causal-conv1d",
}


def check_backend(backend):
    """Validate a backend name, with an error that lists the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown ssm backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


@lru_cache(maxsize=None)
def _load(module, name):
    """Import ``module.name`` once; ``None`` when the package (or its compiled extension) is missing."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, OSError, AttributeError):
        return None


def cuda_kernel(backend, tensor, module, name):
    """The fused kernel ``module.name`` if ``backend`` asks for it on ``tensor``'s device, else ``None``.

    ``None`` means: use another implementation.
    """
    check_backend(backend)
    if backend in ("torch", "numba") or (backend == "auto" and not tensor.is_cuda):
        return None
    kernel = _load(module, name)
    if backend == "cuda":
        if not tensor.is_cuda:
            raise RuntimeError(f"ssm backend 'cuda' needs CUDA tensors, got a tensor on {tensor.device}")
        if kernel is None:
            package = _PROVIDER[module.split(".")[0]]
            raise RuntimeError(
                f"ssm backend 'cuda' needs {module}.{name}, which did not import: "
                f"install recbole-ssm[cuda] ({package}) on a machine with CUDA"
            )
    return kernel


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
    if backend not in ("auto", "numba") or tensor.device.type != "cpu":
        if backend == "numba":
            raise RuntimeError(f"ssm backend 'numba' runs on the CPU, got a tensor on {tensor.device}")
        return False
    reason = compiled_unavailable()
    if reason is None:
        return True
    if backend == "numba":
        raise RuntimeError(f"ssm backend 'numba' is not available: {reason}")
    _warn_once(f"recbole-ssm: the compiled CPU kernels are not available, using the slower PyTorch "
               f"implementation: {reason}")
    return False


@lru_cache(maxsize=None)
def _warn_once(message):
    warnings.warn(message, RuntimeWarning, stacklevel=3)
