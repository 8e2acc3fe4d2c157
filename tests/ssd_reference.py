"""Naive references shared by the SSD, Mamba-2 and Hydra tests: written for clarity, not speed."""
import torch


def heads(BC, h):
    """(b, l, g, n) -> (b, l, h, n): head i reads group i // (h // g)."""
    g = BC.shape[2]
    return torch.stack([BC[:, :, i // (h // g)] for i in range(h)], dim=2)


def ssd_recurrence(x, dt, A, B, C, D=None, initial_states=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t, one step at a time.

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,), (h, p) or None. Returns y and the
    final state.
    """
    b, l, h, p = x.shape
    B, C = heads(B, h), heads(C, h)
    state = (torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype) if initial_states is None
             else initial_states.clone())
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        y = (state * C[:, t, :, None, :]).sum(-1)
        ys.append(y if D is None else y + D.reshape(h, -1) * x[:, t])  # D: (h,) or (h, p)
    return torch.stack(ys, dim=1), state


def perturbed(block):
    """``block`` in float64 with its SSM parameters moved away from their initial values."""
    block = block.double()
    with torch.no_grad():
        for p in (block.dt_bias, block.A_log, block.D, block.norm.weight, block.conv1d.bias):
            p.add_(torch.randn_like(p) * 0.3)
    return block
