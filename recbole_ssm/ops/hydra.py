"""The quasiseparable matrix mixer of Hydra: two SSD scans, one per direction, plus a diagonal.

Hwang, Lahoti, Dao & Gu, "Hydra: Bidirectional State Space Models Through Generalized Matrix Mixers",
2024. Per head, y = Q x with the quasiseparable matrix

    Q[t, s] = C^f_{t-1} . B^f_s * exp(A * sum_{r=s+1..t-1} dt^f_r) * dt^f_s     for s < t,
    Q[t, t] = D_t,
    Q[t, s] = C^b_{t+1} . B^b_s * exp(A * sum_{r=t+1..s-1} dt^b_r) * dt^b_s     for s > t,

i.e. a forward SSD scan shifted one step later (position t reads the scan's output at t-1, which has
seen x up to t-1), a backward SSD scan of the reversed sequence shifted likewise (position t reads
positions t+1 on), and a diagonal. As in the reference implementation the two directions share x, A and
the dt bias, but have their own dt, B and C. On a CPU with the compiled kernels both scans run in one
pass over the inputs as they are (:func:`recbole_ssm.ops.ssd.fused_recurrent.shifted_bidirectional_scans_fused`);
otherwise they run as one :func:`recbole_ssm.ops.ssd.ssd_scan` call on a batch of 2b sequences, the
forward ones and the flipped ones, and are shifted and summed afterwards.
"""
import torch
import torch.nn.functional as F

from recbole_ssm.ops.backend import use_compiled
from recbole_ssm.ops.positions import at_positions, check_positions
from recbole_ssm.ops.ssd import ssd_scan


def hydra_mixer(x, dt_fwd, dt_bwd, A, B_fwd, C_fwd, B_bwd, C_bwd, D, chunk_size, mask=None, positions=None,
                backend="auto"):
    """Apply Hydra's quasiseparable mixer to ``x``.

    x: (b, l, h, p); dt_fwd, dt_bwd: (b, l, h), >= 0 (softplus and bias already applied), indexed by
    position in the original order; A: (h,), < 0, shared by both directions; B_*, C_*: (b, l, g, n);
    D: the diagonal, (h,) or (b, l, h) (Hydra's D + fc_D(x)); mask: (b, l) bool or None, True marks a
    real position: padded positions neither change a state nor contribute, in either direction, and
    their outputs are 0. Returns y (b, l, h, p) in x's dtype, or (b, h, p) at ``positions`` (b,) only:
    the compiled kernels then scan forward up to the position before each row's position and backward
    from the end down to the one after it (at a row's last real position, nothing), the other
    implementations compute every position.
    """
    if positions is not None:
        check_positions(positions, x.shape[0], x.shape[1])
    if use_compiled(backend, x):
        from recbole_ssm.ops.ssd.fused_recurrent import shifted_bidirectional_scans_fused

        return shifted_bidirectional_scans_fused(x, dt_fwd, dt_bwd, A, B_fwd, C_fwd, B_bwd, C_bwd, D, mask, positions)

    b = x.shape[0]
    if mask is not None:
        # A padded position neither changes a state (dt = 0) nor reads one out (C = 0): the scans' outputs
        # are 0 there, so the scans need no mask of their own (which would mask x and y once more).
        pad = ~mask[..., None]
        x = x.masked_fill(pad[..., None], 0)
        dt_fwd, dt_bwd = dt_fwd.masked_fill(pad, 0), dt_bwd.masked_fill(pad, 0)
        C_fwd, C_bwd = C_fwd.masked_fill(pad[..., None], 0), C_bwd.masked_fill(pad[..., None], 0)

    def both(fwd, bwd):  # the forward sequences, then the reversed ones, along the batch: (2b, l, ...)
        return torch.cat([fwd, bwd.flip(1)])

    y = ssd_scan(both(x, x), both(dt_fwd, dt_bwd), A, both(B_fwd, B_bwd), both(C_fwd, C_bwd), chunk_size,
                 backend=backend)  # (2b, l, h, p)
    y = F.pad(y[:, :-1], (0, 0, 0, 0, 1, 0))  # shift one step later: y[t] <- y[t-1], y[0] <- 0
    y = y[:b] + y[b:].flip(1)
    y = (y + x * D.unsqueeze(-1)).to(x.dtype)  # D: (h, 1) or (b, l, h, 1)
    if mask is not None:
        y = y.masked_fill(~mask[..., None, None], 0)
    return y if positions is None else at_positions(y, positions)
