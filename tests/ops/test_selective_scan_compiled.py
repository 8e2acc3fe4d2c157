"""The compiled (Numba) selective scan against the step-by-step recurrence and the PyTorch path."""
import os
import subprocess
import sys

import pytest
import torch

from recbole_ssm.ops.selective_scan import fused_recurrent, selective_scan, selective_scan_torch
from tests.selective_scan_reference import random_inputs, recurrence

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def outputs_and_grads(scan, inputs, grad_seed=5, **options):
    """y and the gradient of <y, g> for a fixed random g, with respect to every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves, **options)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [leaves[k] for k in leaves], g)
    return y.detach(), dict(zip(leaves, grads))


def compiled(**kwargs):
    return selective_scan(**kwargs, backend="numba")


@pytest.mark.parametrize("batch, d, n, length", [
    (2, 5, 4, 1), (2, 5, 4, 2), (2, 5, 4, 37), (1, 3, 1, 9), (3, 4, 2, 150),  # 150: three backward chunks of 64
])
def test_matches_recurrence_in_float64(batch, d, n, length, monkeypatch):
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 64)
    inputs = random_inputs(batch=batch, d=d, n=n, length=length)
    expected, expected_grads = outputs_and_grads(recurrence, inputs, delta_softplus=True)
    got, grads = outputs_and_grads(compiled, inputs, delta_softplus=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for name in NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10, msg=name)


def test_float32_within_1e_5_relative():
    inputs = random_inputs(batch=3, d=32, n=16, length=80, dtype=torch.float32, seed=2)
    reference = {k: v.double() for k, v in inputs.items()}
    expected, expected_grads = outputs_and_grads(recurrence, reference, delta_softplus=True)
    got, grads = outputs_and_grads(compiled, inputs, delta_softplus=True)
    assert got.dtype == torch.float32

    def relative_error(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert relative_error(got, expected) < 1e-5
    for name in NAMES:
        assert grads[name].dtype == torch.float32
        assert relative_error(grads[name], expected_grads[name]) < 1e-5, name


def test_without_softplus_gate_bias_or_skip():
    inputs = random_inputs(length=23)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    expected = recurrence(u, delta.abs(), A, B, C)
    torch.testing.assert_close(compiled(u=u, delta=delta.abs(), A=A, B=B, C=C), expected, rtol=0, atol=1e-10)
    leaves = [t.clone().requires_grad_() for t in (u, delta.abs(), A, B, C)]
    assert torch.autograd.gradcheck(lambda *args: selective_scan(*args, backend="numba"), leaves)


def test_gradcheck():
    inputs = random_inputs(batch=2, d=2, n=3, length=9, seed=1)
    tensors = [inputs[k].requires_grad_() for k in NAMES]
    assert torch.autograd.gradcheck(
        lambda *args: compiled(**dict(zip(NAMES, args)), delta_softplus=True), tensors)


def test_strong_decay_in_float32():
    # delta * A down to about -200 per step.
    inputs = random_inputs(length=64, delta_scale=10.0, seed=3)
    inputs["A"] = inputs["A"] * 20
    expected, expected_grads = outputs_and_grads(recurrence, inputs, delta_softplus=True)
    got, grads = outputs_and_grads(compiled, {k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    for name in NAMES:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name].double(), expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("length", [0, 1, 70])
def test_initial_and_last_state(length, monkeypatch):
    inputs = random_inputs(length=length)
    inputs["initial_state"] = torch.randn(2, 5, 4, dtype=torch.float64)
    expected, expected_state = recurrence(**inputs, delta_softplus=True, return_last_state=True)
    y, state = compiled(**inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-10)
    # Inputs without gradients take a path around autograd; with them, the same results.
    differentiable = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y_grad, state_grad = compiled(**differentiable, delta_softplus=True, return_last_state=True)
    assert y_grad.requires_grad and torch.equal(y_grad.detach(), y) and torch.equal(state_grad, state)
    assert not state.requires_grad and not state_grad.requires_grad
    for method in ("chunked", "recurrent"):
        y, state = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True, method=method)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-10)
    if length:
        names = NAMES + ("initial_state",)
        _, expected_grads = outputs_and_grads(recurrence, inputs, delta_softplus=True)
        monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 16)   # several chunks from the initial state
        _, grads = outputs_and_grads(compiled, inputs, delta_softplus=True)
        for name in names:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10, msg=name)


def test_half_precision_is_computed_in_float32():
    inputs = random_inputs(length=20, dtype=torch.float32)
    expected = compiled(**inputs, delta_softplus=True)
    got = compiled(**{k: v.bfloat16() for k, v in inputs.items()}, delta_softplus=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_strided_inputs_as_the_block_passes_them():
    # The block hands over transposed views of (batch, length, channels) activations.
    inputs = random_inputs(batch=3, d=6, n=4, length=17)
    views = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v for k, v in inputs.items()}
    views["z"] = torch.cat([inputs["z"], inputs["z"]], dim=1)[:, 6:]   # a slice, as chunk() gives
    torch.testing.assert_close(compiled(**views, delta_softplus=True),
                               recurrence(**inputs, delta_softplus=True), rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch", [1, 5])   # 1: channels split between threads; 5: rows
def test_two_threads_agree_with_one(batch):
    inputs = random_inputs(batch=batch, d=16, n=4, length=40, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = outputs_and_grads(compiled, inputs, delta_softplus=True)
        torch.set_num_threads(2)
        two, two_grads = outputs_and_grads(compiled, inputs, delta_softplus=True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, rtol=0, atol=0)   # rows and channels are independent
    for name in NAMES:  # parameter gradients are summed over threads in another order
        scale = one_grads[name].abs().max().item()
        torch.testing.assert_close(two_grads[name], one_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_chunked_backward_equals_one_chunk(monkeypatch):
    inputs = random_inputs(length=45)
    one_chunk = outputs_and_grads(compiled, inputs, delta_softplus=True)[1]
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 4)
    chunked = outputs_and_grads(compiled, inputs, delta_softplus=True)[1]
    for name in NAMES:
        torch.testing.assert_close(chunked[name], one_chunk[name], rtol=0, atol=1e-12, msg=name)


MEMORY_PROBE = """
import resource, torch
from recbole_ssm.ops.selective_scan import selective_scan
torch.set_num_threads(1)
b, d, length, n = {shape}
g = torch.Generator().manual_seed(0)
inputs = [torch.randn(b, d, length, generator=g), torch.rand(b, d, length, generator=g) * 2,
          -torch.rand(d, n, generator=g) * 32, torch.randn(b, n, length, generator=g),
          torch.randn(b, n, length, generator=g)]
inputs = [t.requires_grad_() for t in inputs]
selective_scan(*[t.detach()[:1, :, :2] for t in inputs[:2]], inputs[2].detach(),
               *[t.detach()[:1, :, :2] for t in inputs[3:]], backend="numba")  # compile first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
selective_scan(*inputs, backend="numba").square().sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_training_memory_is_a_fraction_of_one_state_volume():
    # The compiled scan keeps its inputs and recomputes the states chunk by chunk: its peak grows by
    # the inputs, outputs and gradients (about a dozen (batch, length, d) arrays), never by a
    # (batch, length, d, n) volume.
    shape = (512, 128, 50, 32)
    state_bytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]  # float32: 420 MB
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(shape=shape)], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert probe.returncode == 0, probe.stderr
    growth = int(probe.stdout.split()[-1])
    assert growth < 0.5 * state_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB"
