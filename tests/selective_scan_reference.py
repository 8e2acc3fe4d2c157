"""A step-by-step Mamba-1 selective scan in plain PyTorch, and random inputs for it: the independent
reference that every implementation of the scan is tested against."""
import torch
import torch.nn.functional as F


def recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               initial_state=None, return_last_state=False):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <h_t, C_t> + D u_t, gated by silu(z_t),
    from h_0 = initial_state (zeros when None). With ``return_last_state`` also h_length, (batch, d, n)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d, length = u.shape
    h = torch.zeros(batch, d, A.shape[1], dtype=u.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + (0 if D is None else D * u[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d, 0)
    y = y if z is None else y * F.silu(z)
    return (y, h) if return_last_state else y


def random_inputs(batch=2, d=5, n=4, length=37, dtype=torch.float64, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, d, length, generator=g, dtype=dtype),
        delta=torch.randn(batch, d, length, generator=g, dtype=dtype) * delta_scale,
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 4,
        B=torch.randn(batch, n, length, generator=g, dtype=dtype),
        C=torch.randn(batch, n, length, generator=g, dtype=dtype),
        D=torch.randn(d, generator=g, dtype=dtype),
        z=torch.randn(batch, d, length, generator=g, dtype=dtype),
        delta_bias=torch.randn(d, generator=g, dtype=dtype),
    )
