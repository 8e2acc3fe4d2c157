"""mamba-ssm's Triton kernels (the SSD scan, the gated RMSNorm) on the CPU, in Triton's interpreter,
called through recbole-ssm's own dispatch as on a GPU (``ssm_backend="cuda"`` / ``"auto"``).

    TRITON_INTERPRET=1 python -m tests.triton_interpreter MAMBA_SSM_SOURCES OUTPUT

runs every case of :data:`CASES` and saves, with ``torch.save``, each one's inputs, outputs,
gradients and the kernel calls made; tests/ops/test_triton_interpreter.py compares them with our
PyTorch path in a clean process. MAMBA_SSM_SOURCES is an unpacked mamba-ssm source distribution.

Only what the GPU provides around the kernels is stood in for, never the kernels:
  - ``mamba_ssm`` is a bare package over the sources, so that its ``__init__`` (which imports the
    compiled ``selective_scan_cuda``, and transformers) does not run; the Triton modules import as
    they are;
  - ``torch.cuda.device(None)`` (the wrappers enter ``torch.cuda.device(x.device.index)``, None for a
    CPU tensor) is a null context, and ``torch.cuda.get_device_properties`` reports a multiprocessor
    count (the backward kernels size their grids with it);
  - each autotuned kernel keeps its first configuration: the autotuner would time every one on a GPU;
  - the dispatch sees CPU tensors as CUDA ones (``backend.device_type``), as in the contract tests;
  - the interpreter's ``int()`` of a scalar held in a one-element array (a ``range`` bound in a kernel)
    goes through ``.item()``: Triton 3.6 calls ``int(array)``, which NumPy >= 2.5 refuses (the GPU
    image has NumPy 2.5, as has our Python 3.12 CI stage).
"""
import contextlib
import sys
import time
import types
import warnings
from collections import Counter
from pathlib import Path

import torch

MULTIPROCESSORS = 4
KERNELS = {"mamba_ssm.ops.triton.ssd_combined": "mamba_chunk_scan_combined",
           "mamba_ssm.ops.triton.layernorm_gated": "rmsnorm_fn"}


def randn(*shape, generator):
    return torch.randn(*shape, generator=generator)


def ssd_inputs(b=2, length=24, h=2, p=4, g=2, n=8):
    gen = torch.Generator().manual_seed(0)
    return {"x": randn(b, length, h, p, generator=gen), "dt": torch.rand(b, length, h, generator=gen) + 0.05,
            "A": -(torch.rand(h, generator=gen) * 2 + 0.1), "B": randn(b, length, g, n, generator=gen),
            "C": randn(b, length, g, n, generator=gen), "D": randn(h, generator=gen),
            "initial_states": randn(b, h, p, n, generator=gen)}


def norm_inputs(d=32):
    gen = torch.Generator().manual_seed(1)
    return {"x": randn(2, 10, d, generator=gen), "z": randn(2, 10, d, generator=gen),
            "weight": 1 + 0.3 * randn(d, generator=gen)}


def block_inputs(d_model=16, batch=3, length=13):
    """hidden_states and a mask (True on real items) with rows of 13, 9 and 1 real items."""
    gen = torch.Generator().manual_seed(2)
    return {"hidden_states": randn(batch, length, d_model, generator=gen)}, \
        torch.arange(length) < torch.tensor([length, 9, 1])[:, None]


# name -> (kind, options): the op's keyword options, or the block's class and constructor arguments.
# Small, for the interpreter's sake (each case takes seconds), but crossing chunk boundaries: length
# 24 in chunks of 16, 13 in chunks of 8; 2 heads, and in the SSD case 2 groups.
CASES = {
    "ssd scan, masked, initial and final states": ("ssd", {"chunk_size": 16, "return_final_states": True}),
    "gated rmsnorm, groups of 16, gate before": ("norm", {"group_size": 16, "norm_before_gate": False}),
    "gated rmsnorm, whole, gate after": ("norm", {"group_size": None, "norm_before_gate": True}),
    "Mamba2Block, masked": ("block", {"cls": "Mamba2Block", "d_state": 8, "expand": 1, "headdim": 8,
                                      "chunk_size": 8}),
    "HydraBlock, masked": ("block", {"cls": "HydraBlock", "d_state": 8, "expand": 1, "headdim": 8,
                                     "chunk_size": 8}),
}


def make_block(options):
    from recbole_ssm.modules.hydra import HydraBlock
    from recbole_ssm.modules.mamba2 import Mamba2Block

    options = dict(options)
    cls = {"Mamba2Block": Mamba2Block, "HydraBlock": HydraBlock}[options.pop("cls")]
    torch.manual_seed(0)
    return cls(16, **options)


def run_case(kind, options, backend):
    """(inputs, outputs, gradients of a fixed projection by input / parameter name, block state)."""
    from recbole_ssm.ops.gated_rmsnorm import gated_rmsnorm
    from recbole_ssm.ops.ssd import ssd_scan

    state = None
    if kind == "block":
        block = make_block(options)
        block.backend = block.norm.backend = backend
        state = {k: v.clone() for k, v in block.state_dict().items()}
        inputs, mask = block_inputs()
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        result = (block(leaves["hidden_states"], mask),)
        named = {**leaves, **dict(block.named_parameters())}
    else:
        inputs = ssd_inputs() if kind == "ssd" else norm_inputs()
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        if kind == "ssd":
            mask = torch.arange(24) < torch.tensor([24, 11])[:, None]
            result = ssd_scan(**leaves, **options, mask=mask, backend=backend)
        else:
            result = (gated_rmsnorm(**leaves, **options, backend=backend),)
        named = leaves
    gen = torch.Generator().manual_seed(3)
    sum((out * randn(*out.shape, generator=gen)).sum() for out in result).backward()
    return (inputs, [out.detach() for out in result], {k: v.grad for k, v in named.items()}, state)


def stand_in_for_the_gpu(sources):
    """Install what the module docstring lists; return the Counter of kernel calls."""
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(Path(sources) / "mamba_ssm")]
    sys.modules["mamba_ssm"] = package
    device = torch.cuda.device
    torch.cuda.device = lambda index: contextlib.nullcontext() if index is None else device(index)
    torch.cuda.get_device_properties = lambda _: types.SimpleNamespace(multi_processor_count=MULTIPROCESSORS)

    import importlib

    from triton.runtime.autotuner import Autotuner

    calls = Counter()
    for module_name, function_name in KERNELS.items():
        module = importlib.import_module(module_name)
        kernel = getattr(module, function_name)

        def counted(*args, _kernel=kernel, _name=function_name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        setattr(module, function_name, counted)
    for name, module in list(sys.modules.items()):
        if name.startswith("mamba_ssm.ops.triton."):
            for value in vars(module).values():
                while value is not None and hasattr(value, "fn"):
                    if isinstance(value, Autotuner):
                        value.configs = value.configs[:1]
                    value = value.fn

    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_for_numpy2(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor_for_numpy2

    from recbole_ssm.ops import backend

    backend.device_type = lambda tensor: "cuda" if tensor.device.type == "cpu" else tensor.device.type
    return calls


def main(sources, output):
    calls = stand_in_for_the_gpu(sources)
    torch.set_num_threads(1)
    results = {}
    for name, (kind, options) in CASES.items():
        calls.clear()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Blocks under auto: the causal convolution is CUDA C (causal-conv1d), not Triton, so it
            # falls back to PyTorch with a warning; the SSD scan and the norm run in the interpreter.
            inputs, outputs, grads, state = run_case(kind, options, "auto" if kind == "block" else "cuda")
        results[name] = {"inputs": inputs, "outputs": outputs, "grads": grads, "state": state,
                         "calls": dict(calls),
                         "warnings": [str(w.message) for w in caught if str(w.message).startswith("recbole-ssm")]}
        print(f"{name}: kernel calls {dict(calls)}, {time.perf_counter() - start:.1f} s", flush=True)
    torch.save(results, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
