"""Choice between our pure-PyTorch kernels and the fused CUDA kernels of mamba-ssm / causal-conv1d.

``backend`` is one of:
  - ``"auto"``  (default): the fused kernels when the tensors are on CUDA and the package imports,
                 else the pure-PyTorch implementation;
  - ``"torch"``: always the pure-PyTorch implementation;
  - ``"cuda"``:  always the fused kernels; an error if the tensors are not on CUDA or the package is
                 missing.
Both implementations compute the same function with the same parameters, so a checkpoint moves freely.
"""
import importlib
from functools import lru_cache

BACKENDS = ("auto", "torch", "cuda")

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

    ``None`` means: use the pure-PyTorch implementation.
    """
    check_backend(backend)
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
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
