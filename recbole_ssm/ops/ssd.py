"""The SSD scan of Mamba-2: a selective SSM with a scalar decay per head, computed by blocks.

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality", ICML 2024. For each head, with state h_t (headdim, d_state):

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,        y_t = h_t C_t + D x_t,

i.e. y = M x + D x with the semiseparable matrix M[t, s] = C_t . B_s * exp(sum_{r=s+1..t} dt_r A) * dt_s
(s <= t). The chunked algorithm splits the sequence into chunks of ``chunk_size`` positions: inside a
chunk M is materialised (quadratic, matrix products); between chunks the state is passed on by a
recurrence over chunks, itself written as a small matrix product. No Python loop over time steps.

A position with dt = 0 changes no state and contributes nothing (exp(0) = 1, dt * x B^T = 0): this is
how padding is handled, both at the end of a chunk and for masked sequence positions.
"""
import torch
import torch.nn.functional as F

from recbole_ssm.ops.backend import cuda_kernel


def _segsum(a):
    """Segment sums of ``a`` (..., T): out[..., t, s] = a[s+1] + ... + a[t] for s <= t, -inf above.

    Each entry is a sum of the terms themselves (masked, then cumulated), not a difference of two
    prefix sums, so with a <= 0 every finite entry is <= 0 and exp() of it never overflows.
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    terms = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~ones.tril(-1), 0)  # [k, s] = a_k if k > s
    sums = terms.cumsum(dim=-2)  # [t, s] = sum_{s < k <= t} a_k
    return sums.masked_fill(~ones.tril(0), -torch.inf)


def _check_shapes(x, dt, A, B, C, chunk_size):
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
    _check_shapes(x, dt, A, B, C, chunk_size)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    dtype = torch.promote_types(x.dtype, torch.float32)
    q = max(1, min(chunk_size, l))  # a chunk longer than the sequence would only compute on padding
    pad = -l % q
    # Pad the end to whole chunks with dt = 0 and x = 0: the state passes through unchanged.
    x_, dt_, B_, C_ = (F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (l + pad) // q

    # Chunked views; B and C repeated from groups to heads.
    xdt = (x_ * dt_.unsqueeze(-1)).reshape(b, c, q, h, p)  # dt_s x_s
    B_ = B_.repeat_interleave(h // g, dim=2).reshape(b, c, q, h, n)
    C_ = C_.repeat_interleave(h // g, dim=2).reshape(b, c, q, h, n)
    a = (dt_ * A.to(dtype)).reshape(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q): log-decay per step
    a_cum = a.cumsum(dim=-1)  # (b, h, c, q): log-decay from the chunk start through position t

    # 1. Within each chunk: y[t] = sum_{s <= t in chunk} C_t . B_s exp(segsum[t, s]) dt_s x_s.
    decay = torch.exp(_segsum(a))  # (b, h, c, q_t, q_s)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C_, B_, decay, xdt)

    # 2. Each chunk's own contribution to the state at its end: decay from s+1 to the chunk end.
    decay_to_end = decay[..., -1, :]  # (b, h, c, q)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B_, decay_to_end, xdt)  # (b, c, h, p, n)

    # 3. Between chunks: the state entering chunk z is the initial state and every earlier chunk's
    # contribution, each decayed through the chunks in between.
    if initial_states is None:
        initial_states = x_.new_zeros(b, h, p, n)
    chunk_states = torch.cat([initial_states.to(dtype).unsqueeze(1), chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)  # (b, c+1, h, p, n)
    entering, final_states = states[:, :-1], states[:, -1]

    # 4. The entering state read out at each position, decayed from the chunk start through t.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C_, entering, torch.exp(a_cum))
    y = y.reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        D = D.to(dtype)
        y = y + x.to(dtype) * (D.unsqueeze(-1) if D.dim() == 1 else D)
    y = y.to(x.dtype)
    return (y, final_states) if return_final_states else y


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False, mask=None,
             backend="auto"):
    """The SSD scan, by mamba-ssm's fused kernel (``mamba_chunk_scan_combined``) or in pure PyTorch.

    Arguments as in :func:`ssd_scan_torch`, plus ``mask`` (b, l) bool or None: True marks a real
    position. Masked positions get dt = 0 and x = 0 (no state change, no contribution) and y = 0.
    ``backend``: "auto", "torch" or "cuda" (see :mod:`recbole_ssm.ops.backend`).
    """
    if mask is not None:
        x = x.masked_fill(~mask[..., None, None], 0)
        dt = dt.masked_fill(~mask[..., None], 0)
    kernel = cuda_kernel(backend, x, "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    if kernel is None:
        out = ssd_scan_torch(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                             return_final_states=return_final_states)
    else:
        _check_shapes(x, dt, A, B, C, chunk_size)
        out = kernel(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                     return_final_states=return_final_states)
    y, final_states = out if return_final_states else (out, None)
    if mask is not None:
        y = y.masked_fill(~mask[..., None, None], 0)
    return (y, final_states) if return_final_states else y
