"""The SSD scan in pure PyTorch, by chunks of matrix products: the reference that the other
implementations are tested against.

y = M x + D x with the semiseparable matrix M[t, s] = C_t . B_s * exp(sum_{r=s+1..t} dt_r A) * dt_s
(s <= t). The chunked algorithm splits the sequence into chunks of ``chunk_size`` positions: inside a
chunk M is materialised (quadratic, matrix products); between chunks the state is passed on by a
recurrence over the chunks (a Python loop of one multiply-add per chunk, not per position).

A position with dt = 0 changes no state and contributes nothing (exp(0) = 1, dt * x B^T = 0): this is
how padding is handled, both at the end of a chunk and for masked sequence positions.
"""
import torch
import torch.nn.functional as F

from recbole_ssm.ops.autograd import needs_grad


def _mul(a, b, inplace):
    """a * b, written into ``a`` when ``inplace`` (no gradient needed): on CPU, allocating and first
    touching a large temporary costs about as much as the multiplication itself."""
    return a.mul_(b) if inplace else a * b


def check_shapes(x, dt, A, B, C, chunk_size):
    b, l, h, p = x.shape
    g = B.shape[2]
    if dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(f"dt must be (b, l, h) = {(b, l, h)} and A ({h},); got {tuple(dt.shape)}, {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B and C must both be (b, l, ngroups, d_state) with b, l = {b}, {l}; "
                         f"got {tuple(B.shape)}, {tuple(C.shape)}")
    if h % g != 0:
        raise ValueError(f"the number of heads ({h}) must be a multiple of ngroups ({g})")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def ssd_scan_torch(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
    """The SSD scan in pure PyTorch, by chunks; exact for any length.

    x: (b, l, h, p); dt: (b, l, h), >= 0 (softplus and bias already applied); A: (h,), < 0;
    B, C: (b, l, g, n) with h a multiple of g (head i reads group i // (h // g));
    D: (h,) or (h, p) or None; initial_states: (b, h, p, n) or None.
    Computes in float32 at least (float64 stays float64). Returns y (b, l, h, p) in x's dtype, and with
    ``return_final_states`` also the state after the last position, (b, h, p, n) in the compute dtype.
    """
    check_shapes(x, dt, A, B, C, chunk_size)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g  # heads per group: head i = (group i // r, member i % r)
    dtype = torch.promote_types(x.dtype, torch.float32)
    q = max(1, min(chunk_size, l))  # a chunk longer than the sequence would only compute on padding
    c = -(-l // q)
    inplace = not needs_grad(x, dt, A, B, C, D, initial_states)

    def chunked(t):  # (b, l, ...) -> (b, c, q, ...), the end padded to whole chunks with zeros
        t = t.to(dtype)
        if c * q > l:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, c * q - l))
        return t.view(b, c, q, *t.shape[2:])

    # Padding has dt = 0 and x = 0: the state passes through it unchanged. Sequence order is kept (the
    # layout of x and y), so that the state computations below are batched matrix products over
    # (b, c, g) that need no copies; only the quadratic part within chunks works head by head.
    xdt = chunked(x * dt.unsqueeze(-1))  # (b, c, q, h, p): dt_s x_s
    a_cum = (chunked(dt) * A.to(dtype)).cumsum(dim=2)  # (b, c, q, h): log-decay from the chunk start through t
    B_, C_ = (chunked(t).transpose(2, 3) for t in (B, C))  # (b, c, g, q, n), views

    # 1. Within each chunk: y[t] = sum_{s <= t in chunk} C_t . B_s exp(a_cum[t] - a_cum[s]) dt_s x_s.
    # The exponent is <= 0 on and below the diagonal (a_cum does not increase); above it, it is
    # clamped to 0 (no overflow, no inf or nan forward or backward), and C . B is masked to 0 there.
    # (Masking with -inf before exp() would also be exact, but exp(-inf) is several times slower on CPU.)
    a_h = a_cum.transpose(2, 3).contiguous()  # (b, c, h, q)
    decay = (a_h.unsqueeze(-1) - a_h.unsqueeze(-2)).clamp_(max=0).exp_()  # (b, c, h, q_t, q_s)
    CB = (C_ @ B_.transpose(-1, -2)).tril_()  # (b, c, g, q_t, q_s)
    scores = _mul(decay.view(b, c, g, r, q, q), CB.unsqueeze(3), inplace)  # C_t . B_s exp(...), per head
    y_diag = scores.view(b, c, h, q, q) @ xdt.transpose(2, 3)  # (b, c, h, q, p)

    # 2. Each chunk's own contribution to the state at its end: sum_s exp(a_end - a_cum[s]) dt_s x_s B_s^T.
    decay_to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # (b, c, q, h)
    xdt_end = _mul(xdt, decay_to_end.unsqueeze(-1), inplace)  # xdt is not used after this
    xdt_end = xdt_end.view(b, c, q, g, r * p).transpose(2, 3)  # (b, c, g, q, r*p)
    chunk_states = (xdt_end.transpose(-1, -2) @ B_).view(b, c, h, p * n)  # (b, c, h, p*n)

    # 3. Between chunks, by a recurrence over the chunks (not over positions): the state entering
    # chunk z + 1 is the one entering chunk z, decayed through it, plus chunk z's own contribution.
    chunk_decay = torch.exp(a_cum[:, :, -1]).unsqueeze(-1)  # (b, c, h, 1)
    state = xdt.new_zeros(b, h, p * n) if initial_states is None else initial_states.to(dtype).reshape(b, h, p * n)
    entering = []
    for z in range(c):
        entering.append(state)
        state = torch.addcmul(chunk_states[:, z], state, chunk_decay[:, z])
    final_states = state.view(b, h, p, n)
    entering = torch.stack(entering, dim=1).view(b, c, g, r * p, n)

    # 4. The entering state read out at each position, decayed from the chunk start through t.
    readout = (C_ @ entering.transpose(-1, -2)).transpose(2, 3).reshape(b, c, q, h, p)  # C_t . state
    y = _mul(readout, torch.exp(a_cum).unsqueeze(-1), inplace).add_(y_diag.transpose(2, 3))  # (b, c, q, h, p)
    y = y.reshape(b, c * q, h, p)[:, :l]  # a copy only where g > 1
    if D is not None:
        D = D.to(dtype)
        y = y.addcmul_(x.to(dtype), D.unsqueeze(-1) if D.dim() == 1 else D)
    y = y.to(x.dtype)
    return (y, final_states) if return_final_states else y
