"""mamba-ssm's Triton SSD scan and gated RMSNorm, run on the CPU by Triton's interpreter through our
dispatch (tests/triton_interpreter.py), against our PyTorch path: the real kernels' code, with our
argument layouts, shapes, masks, initial and final states, forward and backward.

What this cannot check, and tests/gpu does: the kernels' GPU arithmetic (TF32 products, bfloat16
under autocast; the interpreter computes float32 products in NumPy) and the compiled CUDA kernels
(selective scan, causal convolution). The sources are those of mamba-ssm 2.3.2.post1, the newest
release the [cuda] extra admits, fetched once per session with pip (the package registry; marker
``registry``).

Cost, measured on the shared 2-core CPU with OMP_NUM_THREADS=1: 66 to 76 s for the module, of which
about 25 s is the download and 53 s the interpreter's process (imports, then SSD scan 8.6 s, the two
norms 1.3 and 0.7 s, Mamba2Block 11.2 s, HydraBlock 20.9 s, forward and backward); the comparisons
take under 2 s. The cases are small (lengths 13 and 24, 2 heads) because the interpreter runs each
Triton program instance in NumPy, one at a time.
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.gpu.settings import relative_error
from tests.triton_interpreter import CASES, run_case

REPO_ROOT = Path(__file__).resolve().parents[2]
MAMBA_SSM = "mamba-ssm==2.3.2.post1"
# The interpreter computes in float32 like our PyTorch path, in another order (measured: about 2e-7).
TOLERANCE = 1e-5

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case of tests/triton_interpreter.py, run once in a fresh interpreter process."""
    folder = tmp_path_factory.mktemp("mamba-ssm")
    # Downloading the sdist prepares its metadata, which runs setup.py: told to skip the CUDA build.
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
         "-d", str(folder), MAMBA_SSM], capture_output=True, text=True, timeout=600,
        env={**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE"})
    assert download.returncode == 0, f"pip download {MAMBA_SSM} failed:\n{download.stdout[-2000:]}{download.stderr[-2000:]}"
    sdist, = folder.glob("mamba_ssm-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(folder, filter="data")
    output = folder / "results.pt"
    done = subprocess.run([sys.executable, "-m", "tests.triton_interpreter", str(folder / sdist.name[:-7]),
                           str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout[-3000:]}{done.stderr[-5000:]}"
    return torch.load(output, weights_only=False)


@pytest.mark.parametrize("name", CASES)
def test_triton_kernels_equal_the_pytorch_path(interpreted, name):
    kind, options = CASES[name]
    got = interpreted[name]
    inputs, outputs, grads, state = run_case(kind, options, "torch")
    expected_calls = ({"mamba_chunk_scan_combined": 1, "rmsnorm_fn": 1} if kind == "block"
                      else {"mamba_chunk_scan_combined" if kind == "ssd" else "rmsnorm_fn": 1})
    assert got["calls"] == expected_calls
    # Blocks: only the causal convolution (CUDA C, not Triton) falls back, and says so.
    assert all("causal convolution runs in PyTorch" in w for w in got["warnings"])
    for key, value in inputs.items():
        torch.testing.assert_close(got["inputs"][key], value, rtol=0, atol=0)
    if state is not None:
        assert all(torch.equal(got["state"][k], v) for k, v in state.items())
    for index, (out, ref) in enumerate(zip(got["outputs"], outputs, strict=True)):
        assert relative_error(out, ref) <= TOLERANCE, f"output {index}: {relative_error(out, ref):.2e}"
    for key, ref in grads.items():
        error = relative_error(got["grads"][key], ref)
        assert error <= TOLERANCE, f"d/d{key}: relative error {error:.2e}"
