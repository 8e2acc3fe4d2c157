"""The chunked SSD scan against a step-by-step recurrence and against the materialised matrix."""
import pytest
import torch

from recbole_ssm.ops.ssd import ssd_scan, ssd_scan_torch
from tests.ssd_reference import heads, ssd_recurrence as recurrence

F64 = torch.float64


def make_inputs(b=2, l=7, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=F64)
    dt = torch.rand(b, l, h, generator=gen, dtype=F64) + 0.05
    A = -(torch.rand(h, generator=gen, dtype=F64) * 2 + 0.1)
    B = torch.randn(b, l, g, n, generator=gen, dtype=F64)
    C = torch.randn(b, l, g, n, generator=gen, dtype=F64)
    D = torch.randn(h, generator=gen, dtype=F64)
    return x, dt, A, B, C, D


def semiseparable(x, dt, A, B, C, D):
    """y = M x + D x with M[t, s] = C_t . B_s exp(sum_{r=s+1..t} dt_r A) dt_s, for s <= t."""
    b, l, h, p = x.shape
    B, C = heads(B, h), heads(C, h)
    M = torch.zeros(b, h, l, l, dtype=F64)
    for t in range(l):
        for s in range(t + 1):
            decay = torch.exp(dt[:, s + 1:t + 1].sum(1) * A)  # (b, h)
            M[:, :, t, s] = (C[:, t] * B[:, s]).sum(-1) * decay * dt[:, s]
    return torch.einsum("bhts,bshp->bthp", M, x) + D[:, None] * x


@pytest.mark.parametrize("l, chunk_size", [(8, 4), (7, 3), (7, 1), (5, 16), (6, 6)])
def test_matches_recurrence_and_matrix(l, chunk_size):
    x, dt, A, B, C, D = make_inputs(l=l)
    y = ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D)
    assert y.shape == x.shape and y.dtype == F64
    torch.testing.assert_close(y, recurrence(x, dt, A, B, C, D)[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(y, semiseparable(x, dt, A, B, C, D), rtol=0, atol=1e-10)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_groups(g):
    x, dt, A, B, C, D = make_inputs(h=4, g=g)
    torch.testing.assert_close(ssd_scan_torch(x, dt, A, B, C, 3, D=D), semiseparable(x, dt, A, B, C, D),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [2, 3, 10])
def test_initial_and_final_states(chunk_size):
    x, dt, A, B, C, D = make_inputs(l=7)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    y, final = ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_states=h0, return_final_states=True)
    y_ref, final_ref = recurrence(x, dt, A, B, C, D, initial_states=h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-10)
    # Scanning in two pieces, passing the state on, is scanning the whole.
    y1, mid = ssd_scan_torch(x[:, :3], dt[:, :3], A, B[:, :3], C[:, :3], chunk_size, D=D, initial_states=h0,
                             return_final_states=True)
    y2, end = ssd_scan_torch(x[:, 3:], dt[:, 3:], A, B[:, 3:], C[:, 3:], chunk_size, D=D, initial_states=mid,
                             return_final_states=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(end, final_ref, rtol=0, atol=1e-10)


def test_zero_dt_leaves_state_untouched():
    x, dt, A, B, C, D = make_inputs(l=6)
    dt[:, 2:4] = 0
    _, mid = ssd_scan_torch(x[:, :2], dt[:, :2], A, B[:, :2], C[:, :2], 4, return_final_states=True)
    _, after = ssd_scan_torch(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4], 4, return_final_states=True)
    torch.testing.assert_close(after, mid, rtol=0, atol=1e-12)
    # Removing the dt = 0 positions changes nothing at the others (only their D x term is their own).
    keep = [0, 1, 4, 5]
    y_all = ssd_scan_torch(x, dt, A, B, C, 4)
    y_kept = ssd_scan_torch(x[:, keep], dt[:, keep], A, B[:, keep], C[:, keep], 4)
    torch.testing.assert_close(y_all[:, keep], y_kept, rtol=0, atol=1e-10)


def test_mask_is_padding():
    x, dt, A, B, C, D = make_inputs(l=7)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y, final = ssd_scan(x, dt, A, B, C, 3, D=D, mask=mask, return_final_states=True, backend="torch")
    y4, final4 = ssd_scan_torch(x[1:, :4], dt[1:, :4], A, B[1:, :4], C[1:, :4], 3, D=D, return_final_states=True)
    torch.testing.assert_close(y[0], ssd_scan_torch(x, dt, A, B, C, 3, D=D)[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(y[1, :4], y4[0], rtol=0, atol=1e-10)
    assert (y[1, 4:] == 0).all()
    torch.testing.assert_close(final[1], final4[0], rtol=0, atol=1e-10)


def test_causal():
    x, dt, A, B, C, D = make_inputs(l=9)
    y = ssd_scan_torch(x, dt, A, B, C, 4, D=D)
    x2, dt2, B2, C2 = x.clone(), dt.clone(), B.clone(), C.clone()
    for t in (x2, dt2, B2, C2):
        t[:, 5:] = torch.rand_like(t[:, 5:]) + 1
    y2 = ssd_scan_torch(x2, dt2, A, B2, C2, 4, D=D)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=0)
    assert not torch.allclose(y2[:, 5:], y[:, 5:])


def test_stable_with_strong_decay_and_float32():
    # exp(dt A) underflows to 0 over these spans; nothing may overflow to inf or nan, forward or backward.
    x, dt, A, B, C, D = (t.float() for t in make_inputs(l=40))
    dt = (dt * 50).requires_grad_()
    y = ssd_scan_torch(x, dt, A * 10, B, C, 8, D=D)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(dt.grad).all()
    torch.testing.assert_close(y.double(), recurrence(*(t.double() for t in (x, dt.detach(), A * 10, B, C, D)))[0],
                               rtol=1e-4, atol=1e-4)


def test_gradcheck():
    x, dt, A, B, C, D = make_inputs(b=1, l=5, h=2, p=2, g=1, n=2)
    h0 = torch.randn(1, 2, 2, 2, dtype=F64)
    args = [t.requires_grad_() for t in (x, dt, A, B, C, D, h0)]

    def f(x, dt, A, B, C, D, h0):
        return ssd_scan_torch(x, dt, A, B, C, 2, D=D, initial_states=h0, return_final_states=True)

    assert torch.autograd.gradcheck(f, args)


def test_shape_errors():
    x, dt, A, B, C, D = make_inputs(h=4, g=3, n=2)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_scan_torch(x, dt, A, B, C, 4)
    x, dt, A, B, C, D = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan_torch(x, dt, A, B, C, 0)


def test_backend_choice():
    x, dt, A, B, C, D = make_inputs()
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 3, D=D), ssd_scan_torch(x, dt, A, B, C, 3, D=D))  # auto, CPU
    with pytest.raises(RuntimeError, match="CUDA"):
        ssd_scan(x, dt, A, B, C, 3, backend="cuda")
    with pytest.raises(ValueError, match="unknown ssm backend"):
        ssd_scan(x, dt, A, B, C, 3, backend="triton")
