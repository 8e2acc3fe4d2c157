"""Hydra's mixer against the materialised quasiseparable matrix; padding; gradients."""
import pytest
import torch

from recbole_ssm.ops.hydra import hydra_mixer
from recbole_ssm.ops.ssd import fused_recurrent
from tests.conftest import CPU_BACKENDS
from tests.ssd_reference import heads

F64 = torch.float64


def make_inputs(b=2, l=6, h=4, p=3, g=2, n=5, seed=0, data_dependent_D=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return dict(
        x=randn(b, l, h, p), dt_fwd=rand(b, l, h) + 0.05, dt_bwd=rand(b, l, h) + 0.05, A=-(rand(h) * 2 + 0.1),
        B_fwd=randn(b, l, g, n), C_fwd=randn(b, l, g, n), B_bwd=randn(b, l, g, n), C_bwd=randn(b, l, g, n),
        D=randn(b, l, h) if data_dependent_D else randn(h),
    )


def quasiseparable(x, dt_fwd, dt_bwd, A, B_fwd, C_fwd, B_bwd, C_bwd, D):
    """y = Q x, per head, with Q built entry by entry:
    below the diagonal, the forward semiseparable matrix shifted down one row;
    above it, the backward one shifted up one row; on it, D."""
    b, l, h, p = x.shape
    Bf, Cf, Bb, Cb = (heads(t, h) for t in (B_fwd, C_fwd, B_bwd, C_bwd))
    D = D.expand(b, l, h)
    Q = torch.zeros(b, h, l, l, dtype=F64)
    for t in range(l):
        for s in range(l):
            if s < t:
                decay = torch.exp(dt_fwd[:, s + 1:t].sum(1) * A)
                Q[:, :, t, s] = (Cf[:, t - 1] * Bf[:, s]).sum(-1) * decay * dt_fwd[:, s]
            elif s > t:
                decay = torch.exp(dt_bwd[:, t + 1:s].sum(1) * A)
                Q[:, :, t, s] = (Cb[:, t + 1] * Bb[:, s]).sum(-1) * decay * dt_bwd[:, s]
            else:
                Q[:, :, t, t] = D[:, t]
    return torch.einsum("bhts,bshp->bthp", Q, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b, l, chunk_size, g, data_dependent_D", [
    (2, 6, 2, 2, True), (2, 7, 3, 1, True), (2, 5, 16, 4, False), (2, 1, 4, 2, True), (1, 9, 4, 2, True),
])
def test_matches_quasiseparable_matrix(b, l, chunk_size, g, data_dependent_D, backend):
    inputs = make_inputs(b=b, l=l, g=g, data_dependent_D=data_dependent_D)
    y = hydra_mixer(**inputs, chunk_size=chunk_size, backend=backend)
    assert y.shape == inputs["x"].shape and y.dtype == F64
    torch.testing.assert_close(y, quasiseparable(**inputs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_invariance(backend):
    """Positions appended with mask False change nothing at the real ones; their outputs are 0."""
    real = make_inputs(b=1, l=5)
    y_real = hydra_mixer(**real, chunk_size=2, backend=backend)
    for pad in (1, 3, 8):
        padded = make_inputs(b=1, l=5 + pad, seed=1)  # random, large junk at the padded positions
        for name, value in real.items():
            if value.dim() > 1:
                padded[name][:, :5] = value
        padded["A"] = real["A"]
        mask = torch.arange(5 + pad).unsqueeze(0) < 5
        y = hydra_mixer(**padded, chunk_size=2, mask=mask, backend=backend)
        torch.testing.assert_close(y[:, :5], y_real, rtol=0, atol=1e-10)
        assert (y[:, 5:] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mask_matches_matrix_on_the_real_part(backend):
    inputs = make_inputs(b=2, l=7)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    y = hydra_mixer(**inputs, chunk_size=3, mask=mask, backend=backend)
    short = {k: (v[1:, :3] if v.dim() > 1 else v) for k, v in inputs.items()}
    torch.testing.assert_close(y[1, :3], quasiseparable(**short)[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(y[0], quasiseparable(**inputs)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_padding_on_both_sides_is_removing_it(chunk_size, backend):
    """Padding before and after the real positions acts as if it were not there; its outputs are 0."""
    inputs = make_inputs(b=2, l=9)
    mask = torch.tensor([[False, False, True, True, True, True, True, False, False],
                         [False, True, True, True, True, True, True, True, True]])
    y = hydra_mixer(**inputs, chunk_size=chunk_size, mask=mask, backend=backend)
    for i in range(2):
        kept = {k: (v[i:i + 1, mask[i]] if v.dim() > 1 else v) for k, v in inputs.items()}
        torch.testing.assert_close(y[i, mask[i]], quasiseparable(**kept)[0], rtol=0, atol=1e-10)
        assert (y[i, ~mask[i]] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend, monkeypatch):
    """Gradients of every input; the compiled backward in chunks of 2 positions (several chunks per
    direction, the reversed one included)."""
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 2)
    inputs = make_inputs(b=1, l=6, h=2, p=2, g=1, n=2)
    names = list(inputs)
    mask = torch.tensor([[False, True, False, True, True, False]])  # padding before, inside and after

    def f(*args):
        return hydra_mixer(**dict(zip(names, args)), chunk_size=2, mask=mask, backend=backend)

    assert torch.autograd.gradcheck(f, [v.requires_grad_() for v in inputs.values()])


def test_compiled_float32_matches_the_reference(monkeypatch):
    """float32 through the compiled scans, outputs and every gradient, against float64 through PyTorch;
    a batch of 3 rows on 2 threads splits rows unevenly, length 70 spans two backward chunks of 64."""
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 64)
    inputs = make_inputs(b=3, l=70, h=4, p=8, g=2, n=16, seed=3)
    inputs["A"] = inputs["A"] * 0.3
    grad_y = torch.randn(3, 70, 4, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    mask = torch.arange(70).unsqueeze(0) < torch.tensor([[70], [41], [1]])
    results = {}
    for backend, dtype in (("torch", F64), ("numba", torch.float32)):
        leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            y = hydra_mixer(**leaves, chunk_size=16, mask=mask, backend=backend)
            y.backward(grad_y.to(dtype))
        finally:
            torch.set_num_threads(previous)
        results[backend] = [y.double()] + [leaves[k].grad.double() for k in leaves]
    for name, ours, reference in zip(["y"] + list(inputs), results["numba"], results["torch"]):
        scale = reference.abs().max()
        assert (ours - reference).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b", [1, 4])   # compiled: 1 splits the heads between threads, 4 the rows
def test_output_at_positions_equals_the_matrix_there(b, backend, monkeypatch):
    """With ``positions`` (the compiled kernels: the forward scan stops before each position, the
    backward one covers the positions after it; the backward pass in chunks of 2 positions), output
    and every gradient as the quasiseparable matrix's at those positions; first, middle and last
    positions, padding inside and after, a padded position asked for (output 0)."""
    monkeypatch.setattr(fused_recurrent, "BACKWARD_CHUNK", 2)
    inputs = make_inputs(b=b, l=8)
    positions = torch.tensor([5, 0, 7, 6])[:b]
    mask = torch.ones(b, 8, dtype=torch.bool)
    mask[0, 2:4] = False
    if b > 1:
        mask[1, 6:] = mask[3, 5:] = False
    rows = torch.arange(b)
    weights = torch.randn(b, 4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    results = []
    for at in (True, False):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        if at:
            y = hydra_mixer(**leaves, chunk_size=3, mask=mask, positions=positions, backend=backend)
        else:  # the matrix on the real positions of each row, zero at padded ones
            keep = {k: v * (mask[..., None, None] if v.dim() == 4 else mask[..., None]) if v.dim() > 1 else v
                    for k, v in leaves.items()}
            y = (quasiseparable(**keep) * mask[..., None, None])[rows, positions]
        assert y.shape == (b, 4, 3)
        results.append((y, torch.autograd.grad((y * weights).sum(), list(leaves.values()))))
    (y, grads), (expected, expected_grads) = results
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    for name, got, want in zip(inputs, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=name)
    if b > 1:
        assert (y[3] == 0).all()


def test_positions_are_checked():
    inputs = make_inputs(l=5)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 5\)"):
        hydra_mixer(**inputs, chunk_size=2, positions=torch.tensor([0, -1]), backend="numba")
