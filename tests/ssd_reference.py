"""Naive references shared by the SSD, Mamba-2 and Hydra tests (written for clarity, not speed), and the
checks that the block tests share."""
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


SSD_BLOCK_PARAMETERS = ("dt_bias", "A_log", "D", "norm.weight", "conv1d.bias")


def perturbed(block, names=SSD_BLOCK_PARAMETERS):
    """``block`` in float64 with the parameters ``names`` (by default the SSM parameters of the Mamba-2
    and Hydra blocks) moved away from their initial values, where channels and heads share a value."""
    block = block.double()
    with torch.no_grad():
        for name in names:
            p = block.get_parameter(name)
            p.add_(torch.randn_like(p) * 0.3)
    return block


def assert_gradients_match(block, reference_forward, u, atol):
    """The block's gradients (training path) equal those of ``reference_forward(block, u)``: with
    respect to the input and to every parameter, for a random weighting of the outputs."""
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(7), dtype=u.dtype)
    names, parameters = zip(*block.named_parameters())
    u = u.detach().requires_grad_()
    got = torch.autograd.grad((block(u) * weights).sum(), (u, *parameters))
    expected = torch.autograd.grad((reference_forward(block, u) * weights).sum(), (u, *parameters))
    for name, g, e in zip(("input", *names), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol, msg=lambda m: f"gradient of {name}: {m}")
