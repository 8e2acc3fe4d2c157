"""The pure-PyTorch selective scan against a step-by-step recurrence written here."""
import os
import subprocess
import sys

import pytest
import torch

from recbole_ssm.ops.selective_scan import chunked as selective_scan_module
from recbole_ssm.ops.selective_scan import fused_recurrent, selective_scan, selective_scan_torch
from recbole_ssm.ops.selective_scan.chunked import _decay
from tests.selective_scan_reference import random_inputs, recurrence


@pytest.mark.parametrize("length", [1, 2, 7, 37, 100])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16, 128])
def test_chunked_matches_recurrence_in_float64(length, chunk_size):
    inputs = random_inputs(length=length)
    expected = recurrence(**inputs, delta_softplus=True)
    got = selective_scan_torch(**inputs, delta_softplus=True, chunk_size=chunk_size, method="chunked")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length", [1, 37])
def test_recurrent_matches_recurrence_in_float64(length):
    inputs = random_inputs(length=length)
    got = selective_scan_torch(**inputs, delta_softplus=True, method="recurrent")
    torch.testing.assert_close(got, recurrence(**inputs, delta_softplus=True), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_empty_sequence(method):
    inputs = random_inputs(length=0)
    assert selective_scan_torch(**inputs, delta_softplus=True, method=method).shape == (2, 5, 0)


def test_auto_method_differentiates_in_training_and_scans_in_place_otherwise():
    inputs = random_inputs(length=21)
    inputs["u"].requires_grad_()
    expected = recurrence(**inputs, delta_softplus=True)
    trained = selective_scan_torch(**inputs, delta_softplus=True)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(trained.sum(), inputs["u"])
    (expected_grad,) = torch.autograd.grad(expected.sum(), inputs["u"])
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan_torch(**inputs, delta_softplus=True), expected,
                                   rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="auto, chunked, recurrent"):
        selective_scan_torch(**inputs, method="parallel")


def test_without_softplus_gate_or_skip():
    inputs = random_inputs(length=23)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    expected = recurrence(u, delta.abs(), A, B, C)
    for method in ("chunked", "recurrent"):
        got = selective_scan_torch(u, delta.abs(), A, B, C, method=method)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_causal():
    inputs = random_inputs(length=30)
    before = selective_scan_torch(**inputs, delta_softplus=True, method="chunked")
    t = 17
    changed = {k: v.clone() for k, v in inputs.items()}
    for key in ("u", "delta", "B", "C", "z"):
        changed[key][..., t + 1:] += torch.randn_like(changed[key][..., t + 1:])
    after = selective_scan_torch(**changed, delta_softplus=True, method="chunked")
    torch.testing.assert_close(after[..., :t + 1], before[..., :t + 1], rtol=0, atol=0)
    assert not torch.allclose(after[..., t + 1:], before[..., t + 1:])


def test_stable_for_strong_decay_in_float32():
    # delta * A down to about -200 per step: a log-space cumulative sum would overflow float32.
    inputs = random_inputs(length=64, delta_scale=10.0, seed=3)
    inputs["A"] = inputs["A"] * 20
    expected = recurrence(**inputs, delta_softplus=True)
    for method in ("chunked", "recurrent"):
        got = selective_scan_torch(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True,
                                   method=method)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_gradcheck():
    inputs = random_inputs(batch=1, d=2, n=3, length=9, seed=1)
    names = list(inputs)
    tensors = [inputs[k].requires_grad_() for k in names]

    def scan(*args):
        return selective_scan_torch(**dict(zip(names, args)), delta_softplus=True, chunk_size=4,
                                    method="chunked")

    assert torch.autograd.gradcheck(scan, tensors)


def test_dispatch_on_cpu(record_calls):
    inputs = random_inputs(length=11)
    expected = recurrence(**inputs, delta_softplus=True)
    calls = record_calls(fused_recurrent, "_forward")
    for backend, compiled in (("auto", True), ("numba", True), ("torch", False)):
        calls.clear()
        got = selective_scan(**inputs, delta_softplus=True, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        assert bool(calls) == compiled, backend
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="auto, torch, numba, cuda"):
        selective_scan(**inputs, backend="triton")


@pytest.mark.parametrize("method,slice_elements", [
    ("chunked", 1), ("chunked", 500), ("recurrent", 1), ("recurrent", 50)])  # 1 row; 4 and 2 rows
def test_batch_scanned_in_slices(monkeypatch, method, slice_elements):
    """Slices of one row, and of a few rows with a remainder, give the same result."""
    monkeypatch.setattr(selective_scan_module, "CACHE_SLICE_ELEMENTS", slice_elements)
    inputs = random_inputs(batch=5, length=29)
    expected = recurrence(**inputs, delta_softplus=True)
    got = selective_scan_torch(**inputs, delta_softplus=True, method=method)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decays_never_subnormal(dtype):
    # The training scan's decays stay normal numbers (subnormals take the CPU's slow path) and equal
    # exp() wherever exp() is above 1e-19 in float32 / 1e-150 in float64.
    tiny = torch.finfo(dtype).tiny
    exponent = -torch.logspace(-3, 4, 200, dtype=dtype)
    decays = _decay(exponent)
    assert (decays >= tiny ** 0.5 * 0.999).all() and (decays <= 1).all()
    exact = torch.exp(exponent)
    kept = exact > tiny ** 0.5
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(decays[kept], exact[kept], rtol=0, atol=0)
    assert (exact[~kept] < decays[~kept]).all() and (decays[~kept] * decays[~kept] >= tiny * 0.99).all()


MEMORY_PROBE = """
import resource, torch
from recbole_ssm.ops.selective_scan import selective_scan_torch
torch.set_num_threads(1)
b, d, length, n = {shape}
g = torch.Generator().manual_seed(0)
inputs = [torch.randn(b, d, length, generator=g), torch.rand(b, d, length, generator=g) * 2,
          -torch.rand(d, n, generator=g) * 32, torch.randn(b, n, length, generator=g),
          torch.randn(b, n, length, generator=g)]
inputs = [t.requires_grad_() for t in inputs]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
selective_scan_torch(*inputs).square().sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_training_memory_stays_below_three_state_volumes():
    # Training keeps only the scan's inputs and recomputes each batch slice in backward, so the peak
    # stays near one (batch, length, d, n) state volume: about 1.8 of them here. Without the
    # recomputation (or with it defeated, as a custom autograd Function once did) it was 4.5-8.7.
    shape = (512, 128, 50, 32)
    state_bytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]  # float32: 420 MB
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(shape=shape)], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert probe.returncode == 0, probe.stderr
    growth = int(probe.stdout.split()[-1])
    assert growth < 3 * state_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB"
