"""The selective scan in pure PyTorch: the reference that the compiled and CUDA kernels are tested
against, and the fallback where neither loads.

Without gradients it runs the recurrence in place, one position at a time. For training it is a
two-level scan. The sequence is cut into chunks of T steps; first the
recurrence runs over the T positions of a chunk for all chunks at once, each chunk starting from a
zero state; then the chunk-end states are carried across chunks, and each position adds the carried
state, decayed to it, to its output. With T = ceil(sqrt(length)) that is about 3 * sqrt(length)
vectorised steps instead of length, with the same arithmetic as the plain recurrence. Only decays
in [0, 1] are ever formed, so the scan is exact and stable for any step size (a log-space cumulative
sum is not: it overflows once a chunk's total decay leaves the float range).
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recbole_ssm.ops.autograd import needs_grad

# Elements of the per-step state (rows x d x chunks x n) that one slice of the batch may hold.
CACHE_SLICE_ELEMENTS = 1 << 20
METHODS = ("auto", "chunked", "recurrent")


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         initial_state=None, return_last_state=False, chunk_size=None, method="auto"):
    """Pure-PyTorch selective scan; arguments as :func:`recbole_ssm.ops.selective_scan.selective_scan`,
    plus ``chunk_size`` (of the chunked scan; default ceil(sqrt(length))) and ``method``: "chunked",
    "recurrent", or "auto" (recurrent when no gradient is needed, else chunked)."""
    if method not in METHODS:
        raise ValueError(f"unknown scan method {method!r}; choose one of {', '.join(METHODS)}")
    differentiable = needs_grad(u, delta, A, B, C, delta_bias, initial_state)
    out_dtype = u.dtype
    dtype = torch.promote_types(u.dtype, torch.float32)  # at least float32, float64 stays float64
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if initial_state is None:
        initial_state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    initial_state = initial_state.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if method == "recurrent" or (method == "auto" and not differentiable):
        y, last_state = _in_slices(_recurrent_scan, 1, u, delta, A, B, C, initial_state)
    else:
        y, last_state = _chunked_scan(u, delta, A, B, C, initial_state, chunk_size)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(out_dtype)
    return (y, last_state) if return_last_state else y


def _decay(exponent):
    """exp(exponent) for exponents <= 0, with exponents below half the log of the dtype's smallest
    normal number (-43.7 in float32, -354 in float64) raised to that floor.

    Such decays are below 1e-19 (float32), far under rounding, so the result does not change; but
    keeping them, and their products with each other, out of the subnormal range avoids the CPU's
    slow path for subnormal numbers, which made exp() and the products with the state up to 40x
    slower once a chunk's total decay passed exp(-87). (The no-gradient recurrence does without:
    its per-step exponents rarely get there, and the clamp would cost it 10%.) A custom autograd
    Function with an in-place exp was faster at batch 256 but defeated the per-slice recomputation:
    a batch of 2048 then peaked at 14.5 GB instead of 1.9 GB.
    """
    return torch.exp(exponent.clamp(min=0.5 * math.log(torch.finfo(exponent.dtype).tiny)))


def _in_slices(scan, chunks, u, delta, A, B, C, initial, *args):
    """``scan`` over slices of the batch whose (rows, d, chunks, n) state stays in cache; returns
    (y, last_state), each concatenated over the slices."""
    batch, d, _ = u.shape
    rows = max(1, CACHE_SLICE_ELEMENTS // (d * chunks * A.shape[1]))
    if rows >= batch:
        return scan(u, delta, A, B, C, initial, *args)
    slices = [scan(u[i:i + rows], delta[i:i + rows], A, B[i:i + rows], C[i:i + rows], initial[i:i + rows], *args)
              for i in range(0, batch, rows)]
    return tuple(torch.cat(parts) for parts in zip(*slices))


def _recurrent_scan(u, delta, A, B, C, initial):
    """(y, h_length): y_t = <h_t, C_t> by the recurrence, one in-place update per position, for
    inference only (in-place updates leave autograd nothing to differentiate). Shapes as in
    :func:`selective_scan_torch`; the state before the first position and the last one are (b, d, n)."""
    batch, d, length = u.shape
    state = initial.clone()                                             # (b, d, n)
    decay = torch.empty_like(state)
    # Time-major copies, so that every step reads and writes contiguous blocks.
    step_rate = delta.permute(2, 0, 1).unsqueeze(-1).contiguous()      # (l, b, d, 1)
    drive = (delta * u).permute(2, 0, 1).unsqueeze(-1).contiguous()     # (l, b, d, 1)
    B_t = B.permute(2, 0, 1).unsqueeze(2).contiguous()                  # (l, b, 1, n)
    C_t = C.permute(2, 0, 1).unsqueeze(-1).contiguous()                 # (l, b, n, 1)
    y = u.new_empty(length, batch, d, 1)
    for t in range(length):
        torch.mul(step_rate[t], A, out=decay)
        state.mul_(decay.exp_()).addcmul_(drive[t], B_t[t])
        torch.matmul(state, C_t[t], out=y[t])
    return y.squeeze(-1).permute(1, 2, 0), state                        # (b, d, l), (b, d, n)


def _chunked_scan(u, delta, A, B, C, initial, chunk_size):
    """:func:`_two_level_scan` with ``chunk_size`` (default ceil(sqrt(length))), in cache-sized slices."""
    batch, d, length = u.shape
    if length == 0:
        return u.new_zeros(batch, d, 0), initial
    steps = chunk_size or math.isqrt(length - 1) + 1
    if steps < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunks = -(-length // steps)
    scan = _two_level_scan_recomputed if torch.is_grad_enabled() else _two_level_scan
    return _in_slices(scan, chunks, u, delta, A, B, C, initial, steps, chunks)


def _two_level_scan_recomputed(u, delta, A, B, C, initial, steps, chunks):
    """:func:`_two_level_scan` that keeps only its inputs for the backward pass and recomputes."""
    return checkpoint(_two_level_scan, u, delta, A, B, C, initial, steps, chunks, use_reentrant=False)


def _two_level_scan(u, delta, A, B, C, initial, steps, chunks):
    """(y, h_length): y_t = <h_t, C_t> of the recurrence from the state ``initial`` (b, d, n), with
    ``chunks`` chunks of ``steps`` positions. Shapes as in :func:`selective_scan_torch`."""
    batch, d, length = u.shape
    pad = chunks * steps - length  # padded steps have delta = 0: the identity map, no output used

    def by_step(x):  # (batch, c, length) -> (steps, batch, chunks, c), each step contiguous
        return F.pad(x, (0, pad)).unflatten(-1, (chunks, steps)).permute(3, 0, 2, 1).contiguous()

    # States are laid out (b, chunks, d, n), so reading one out is a matrix product with C.
    # Per-step slices come from unbind(), whose backward is one stack; indexing x[j] in a loop
    # would allocate a full-size zero gradient for every j.
    delta_s = by_step(delta)                                             # (T, b, chunks, d)
    drive_steps = (delta_s * by_step(u)).unsqueeze(-1).unbind(0)         # T x (b, chunks, d, 1)
    delta_steps = delta_s.unsqueeze(-1).unbind(0)                        # T x (b, chunks, d, 1)
    B_steps = by_step(B).unsqueeze(-2).unbind(0)                         # T x (b, chunks, 1, n)
    C_steps = by_step(C).unsqueeze(-1).unbind(0)                         # T x (b, chunks, n, 1)

    # 1. Inside every chunk, from a zero state.
    state = u.new_zeros(batch, chunks, d, A.shape[-1])                  # (b, chunks, d, n)
    local_out = []
    for delta_j, drive_j, B_j, C_j in zip(delta_steps, drive_steps, B_steps, C_steps):
        state = torch.addcmul(_decay(delta_j * A) * state, drive_j, B_j)
        local_out.append(torch.matmul(state, C_j))                       # (b, chunks, d, 1)

    # 2. Carry the chunk-end states across chunks: carried[c] is the true state before chunk c.
    chunk_decays = _decay(delta_s.sum(0).unsqueeze(-1) * A).unbind(1)   # chunks x (b, d, n)
    carry = initial
    carried = []
    for chunk_decay, chunk_state in zip(chunk_decays, state.unbind(1)):
        carried.append(carry)
        carry = chunk_decay * carry + chunk_state
    carried = torch.stack(carried, dim=1)                                # (b, chunks, d, n)

    # 3. Each position adds the carried state, decayed from its chunk's start.
    out = [
        local + torch.matmul(_decay(decay.unsqueeze(-1) * A) * carried, C_j)
        for local, decay, C_j in zip(local_out, delta_s.cumsum(0).unbind(0), C_steps)
    ]                                                                    # T x (b, chunks, d, 1)
    out = torch.cat(out, dim=-1).transpose(1, 2)                         # (b, d, chunks, T)
    return out.flatten(-2)[..., :length], carry                         # (b, d, length), (b, d, n)
