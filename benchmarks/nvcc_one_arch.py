"""nvcc for one GPU architecture, for building mamba-ssm and causal-conv1d on the GPU machine.

    nvcc_one_arch.py ARCH NVCC ARGUMENTS...      e.g. nvcc_one_arch.py 90 /usr/local/cuda/bin/nvcc ...

runs NVCC with ARGUMENTS less every ``-gencode`` target of an architecture other than ARCH (and adds
ARCH's if none is left). Their setup.py files pass a fixed list of ten architectures (sm_75 to sm_121
with CUDA 13), which PyTorch's TORCH_CUDA_ARCH_LIST cannot shorten: torch.utils.cpp_extension adds no
flags of its own once extra_compile_args name an architecture. Compiling mamba-ssm's selective scan
ten times over would not fit one device call. benchmarks/gpu_check.py points PYTORCH_NVCC (which
torch's ninja build uses as the CUDA compiler) at a shim that calls this file.
Standard library only: it runs under ninja, outside the package.
"""
import os
import sys


def one_architecture(arguments, arch):
    """``arguments`` without the -gencode targets of other architectures (both the ``-gencode X``
    and the ``-gencode=X`` forms), with ARCH's own added if none remains."""
    kept, found, index = [], False, 0
    while index < len(arguments):
        argument = arguments[index]
        if argument == "-gencode" and index + 1 < len(arguments):
            target, width = arguments[index + 1], 2
        elif argument.startswith("-gencode="):
            target, width = argument[len("-gencode="):], 1
        else:
            kept.append(argument)
            index += 1
            continue
        if target.startswith(f"arch=compute_{arch},"):
            kept += arguments[index:index + width]
            found = True
        index += width
    if not found:
        kept += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return kept


if __name__ == "__main__":
    arch, nvcc, *rest = sys.argv[1:]
    os.execv(nvcc, [nvcc, *one_architecture(rest, arch)])
