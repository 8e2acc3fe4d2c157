"""The compiled (Numba) SSD scan against the step-by-step recurrence and the chunked PyTorch path."""
import pytest
import torch

from recbole_ssm.ops.ssd import fused_recurrent, ssd_scan, ssd_scan_torch
from tests.ssd_reference import ssd_recurrence

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_states")


def make_inputs(b=2, l=7, h=4, p=3, g=2, n=5, seed=0, dtype=torch.float64, dt_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, l, h, p, generator=gen, dtype=dtype),
        dt=(torch.rand(b, l, h, generator=gen, dtype=dtype) + 0.05) * dt_scale,
        A=-(torch.rand(h, generator=gen, dtype=dtype) * 2 + 0.1),
        B=torch.randn(b, l, g, n, generator=gen, dtype=dtype),
        C=torch.randn(b, l, g, n, generator=gen, dtype=dtype),
        D=torch.randn(h, generator=gen, dtype=dtype),
        initial_states=torch.randn(b, h, p, n, generator=gen, dtype=dtype),
    )


def compiled(x, dt, A, B, C, D, initial_states):
    return ssd_scan(x, dt, A, B, C, 4, D=D, initial_states=initial_states, return_final_states=True,
                    backend="numba")


def reference(x, dt, A, B, C, D, initial_states):
    return ssd_recurrence(x, dt, A, B, C, D, initial_states=initial_states)


def outputs_and_grads(scan, inputs, seed=7):
    """(y, final state) and the gradients of <y, g> + <final, G> for fixed random g, G."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, final = scan(**leaves)
    gen = torch.Generator().manual_seed(seed)
    g_y, g_final = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in (y, final))
    grads = torch.autograd.grad([y, final], list(leaves.values()), [g_y, g_final])
    return y.detach(), final.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("b, l, h, p, g, n", [
    (2, 1, 4, 3, 2, 5), (2, 7, 4, 3, 2, 5), (1, 37, 2, 4, 1, 1), (2, 150, 4, 3, 4, 2),  # 150: 3 chunks of 64
])
def test_matches_recurrence_in_float64(b, l, h, p, g, n, monkeypatch):
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 64)
    inputs = make_inputs(b, l, h, p, g, n)
    y, final, grads = outputs_and_grads(compiled, inputs)
    expected_y, expected_final, expected_grads = outputs_and_grads(reference, inputs)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-10)
    for name in NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10, msg=name)


def test_D_per_channel_and_no_D():
    inputs = make_inputs()
    inputs["D"] = torch.randn(4, 3, dtype=torch.float64)
    y, final, grads = outputs_and_grads(compiled, inputs)
    expected_y, _, expected_grads = outputs_and_grads(reference, inputs)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads["D"], expected_grads["D"], rtol=0, atol=1e-10)
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 4, backend="numba"), ssd_recurrence(x, dt, A, B, C)[0],
                               rtol=0, atol=1e-10)


def test_float32_within_1e_5_relative():
    inputs = make_inputs(b=3, l=60, h=8, p=16, g=2, n=16, seed=1)
    y, final, grads = outputs_and_grads(compiled, {k: v.float() for k, v in inputs.items()})
    expected_y, expected_final, expected_grads = outputs_and_grads(reference, inputs)

    def relative_error(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert y.dtype == torch.float32
    assert relative_error(y, expected_y) < 1e-5 and relative_error(final, expected_final) < 1e-5
    for name in NAMES:
        assert relative_error(grads[name], expected_grads[name]) < 1e-5, name


def test_strong_decay_in_float32():
    inputs = make_inputs(l=40, seed=2, dt_scale=60.0)   # dt * A down to about -130 per position
    y, final, grads = outputs_and_grads(compiled, {k: v.float() for k, v in inputs.items()})
    expected_y, expected_final, expected_grads = outputs_and_grads(reference, inputs)
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-4, atol=1e-4)
    for name in NAMES:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name].double(), expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def test_gradcheck():
    inputs = make_inputs(b=2, l=5, h=2, p=2, g=1, n=3, seed=3)
    assert torch.autograd.gradcheck(lambda *args: compiled(*args),
                                    [inputs[k].requires_grad_() for k in NAMES])


def test_matches_chunked_path_with_mask_and_empty_sequence():
    inputs = make_inputs(l=9)
    x, dt, A, B, C, D = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D"))
    mask = torch.arange(9) < torch.tensor([[9], [4]])
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 4, D=D, mask=mask, backend="numba"),
                               ssd_scan(x, dt, A, B, C, 4, D=D, mask=mask, backend="torch"), rtol=0, atol=1e-10)
    empty = make_inputs(l=0)
    y, final = ssd_scan(*(empty[k] for k in ("x", "dt", "A", "B", "C")), 4,
                        initial_states=empty["initial_states"], return_final_states=True, backend="numba")
    assert y.shape == (2, 0, 4, 3)
    torch.testing.assert_close(final, empty["initial_states"])


def test_masked_positions_skipped_like_the_chunked_path(monkeypatch):
    """Padded positions at the start, inside and at the end (the compiled kernels skip them; the
    PyTorch path zeroes their x, dt and y): outputs, final states and every gradient agree, the
    backward pass in chunks of 3 positions."""
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 3)
    inputs = make_inputs(l=11)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :2] = mask[0, 5:7] = mask[1, 8:] = False

    def scan(backend):
        def run(x, dt, A, B, C, D, initial_states):
            return ssd_scan(x, dt, A, B, C, 4, D=D, initial_states=initial_states, return_final_states=True,
                            mask=mask, backend=backend)
        return run

    y, final, grads = outputs_and_grads(scan("numba"), inputs)
    expected_y, expected_final, expected_grads = outputs_and_grads(scan("torch"), inputs)
    assert (y[~mask] == 0).all()
    without_autograd = scan("numba")(**inputs)  # inputs without gradients: the path around autograd
    assert torch.equal(without_autograd[0], y) and torch.equal(without_autograd[1], final)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-10)
    for name in NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("b", [1, 5])   # 1: heads split between threads; 5: rows
def test_two_threads_agree_with_one(b):
    inputs = {k: v.float() for k, v in make_inputs(b=b, l=30, h=4, p=8, g=2, n=8).items()}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = outputs_and_grads(compiled, inputs)
        torch.set_num_threads(2)
        two = outputs_and_grads(compiled, inputs)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two[0], one[0], rtol=0, atol=0)
    torch.testing.assert_close(two[1], one[1], rtol=0, atol=0)
    for name in NAMES:  # parameter gradients are summed over threads in another order
        scale = one[2][name].abs().max().item()
        torch.testing.assert_close(two[2][name], one[2][name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_chunked_backward_equals_one_chunk(monkeypatch):
    inputs = make_inputs(l=45)
    one_chunk = outputs_and_grads(compiled, inputs)[2]
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 4)
    chunked = outputs_and_grads(compiled, inputs)[2]
    for name in NAMES:
        torch.testing.assert_close(chunked[name], one_chunk[name], rtol=0, atol=1e-12, msg=name)


def test_auto_uses_the_compiled_scan_on_cpu(record_calls):
    calls = record_calls(fused_recurrent, "_forward")
    inputs = make_inputs()
    x, dt, A, B, C, D = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D"))
    auto = ssd_scan(x, dt, A, B, C, 4, D=D)
    assert calls
    calls.clear()
    torch.testing.assert_close(auto, ssd_scan(x, dt, A, B, C, 4, D=D, backend="torch"), rtol=0, atol=1e-10)
    torch.testing.assert_close(auto, ssd_scan_torch(x, dt, A, B, C, 4, D=D), rtol=0, atol=1e-10)
    assert not calls


@pytest.mark.parametrize("b", [1, 4])   # 1: heads split between threads; 4: rows
def test_output_at_positions_stops_each_row_there(b, monkeypatch):
    """With ``positions`` the kernels scan each row up to its position only (the backward pass walking
    back from it, in chunks of 3 positions): output and every gradient (the initial state's too) as
    the step-by-step recurrence's at those positions, on one and two threads; padded positions
    before, inside and after; a row's first and last positions."""
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 3)
    inputs = make_inputs(b=b, l=11)
    positions = torch.tensor([10, 0, 6, 8])[:b]
    mask = torch.ones(b, 11, dtype=torch.bool)
    mask[0, 3:5] = False
    if b > 1:
        mask[2, :2] = mask[3, 8:] = False   # row 3 asks for a padded position: output 0
    rows = torch.arange(b)

    def at_positions(x, dt, A, B, C, D, initial_states):
        y = ssd_scan(x, dt, A, B, C, 4, D=D, initial_states=initial_states, mask=mask, positions=positions,
                     backend="numba")
        return y, y[:, :0]     # no final state with positions: an empty stand-in for outputs_and_grads

    def whole_then_indexed(x, dt, A, B, C, D, initial_states):
        keep = mask[..., None]
        y, _ = ssd_recurrence(x * keep[..., None], dt * keep, A, B, C, D, initial_states=initial_states)
        y = (y * keep[..., None])[rows, positions]
        return y, y[:, :0]

    expected_y, _, expected_grads = outputs_and_grads(whole_then_indexed, inputs)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            y, _, grads = outputs_and_grads(at_positions, inputs)
            assert y.shape == (b, 4, 3)
            torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-10)
            for name in NAMES:
                torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10, msg=name)
            without_autograd, _ = at_positions(**inputs)
            torch.testing.assert_close(without_autograd, y, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    if b > 1:
        assert (y[3] == 0).all()


def test_positions_are_checked():
    inputs = make_inputs(l=5)
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    for backend in ("numba", "torch"):
        with pytest.raises(ValueError, match=r"positions must be in \[0, 5\).*got 1\.\.5"):
            ssd_scan(x, dt, A, B, C, 4, positions=torch.tensor([1, 5]), backend=backend)
        with pytest.raises(ValueError, match=r"positions must be \(2,\) integers.*shape \(3,\)"):
            ssd_scan(x, dt, A, B, C, 4, positions=torch.tensor([1, 2, 3]), backend=backend)
        with pytest.raises(ValueError, match="positions and return_final_states cannot be combined"):
            ssd_scan(x, dt, A, B, C, 4, positions=torch.tensor([1, 2]), return_final_states=True, backend=backend)


def test_heads_split_across_a_group_between_threads():
    """One row on two threads: heads 0:3 and 3:6, the second thread's range starting inside a group of
    two heads (3 groups); outputs, final states and gradients as the recurrence's."""
    inputs = make_inputs(b=1, l=13, h=6, p=3, g=3, n=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y, final, grads = outputs_and_grads(compiled, inputs)
    finally:
        torch.set_num_threads(threads)
    expected_y, expected_final, expected_grads = outputs_and_grads(reference, inputs)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-10)
    for name in NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10, msg=name)
