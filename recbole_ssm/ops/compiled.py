"""What the compiled CPU kernels (Numba) share: their compiler options, the exponential and softplus
they vectorise, and the threads they run on.

Constants: Numba types a literal ``1`` as int64 and int64 with float32 as float64, so a float32 kernel
writes its constants as float32 (or calls the helpers here, which do).

Importing this module imports Numba; :mod:`recbole_ssm.ops.backend` imports it only when a CPU
tensor first needs a compiled kernel, and the kernels compile on their first call for each dtype
(cached on disk by Numba: next to the sources if that folder is writable, else in Numba's per-user
cache folder, or ``NUMBA_CACHE_DIR``).

Precision. LLVM vectorises a loop that calls ``math.exp`` only with Intel's SVML library, which the
pip llvmlite does not ship; so float32 kernels use :func:`exp32`, a polynomial that vectorises. The
kernels are compiled with ``reassoc`` (so that sums over the state vectorise), and under
reassociation LLVM folds a Cody-Waite argument reduction ``(x - k*LN2_HI) - k*LN2_LO`` into
``x - k*(LN2_HI + LN2_LO)``, which rounds the split ln 2 back to float32 (relative error 3e-7 instead
of 8e-8). :func:`exp32` therefore reduces with two fused multiply-adds, which reassociation does not
touch; ``tests/ops/test_compiled.py`` bounds its error inside a kernel compiled with :data:`FASTMATH`.
float64 kernels call ``math.exp`` and ``math.log1p``: they are the reference, not the fast path.
"""
import ctypes
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, literal_unroll, njit, types
from numba.extending import intrinsic, overload

# reassoc lets LLVM vectorise sums; contract fuses multiply-adds. Neither changes a result by more
# than rounding; no flag assumes away inf, nan or signed zeros.
FASTMATH = {"reassoc", "contract"}
JIT_OPTIONS = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")

_F = np.float32
LOG2E = 1.4426950408889634       # log2(e): exp(x) = 2**(x LOG2E)
LN2 = 0.6931471805599453         # ln(2): 2**x = exp(x LN2)
_LOG2E = _F(LOG2E)
_LN2_HI = _F(0.693359375)        # 9 significant bits: k * _LN2_HI is exact for |k| < 2**15
_LN2_LO = _F(-2.12194440e-4)     # ln 2 - _LN2_HI
_X_MIN, _X_MAX = _F(-88.0), _F(89.0)
_K_MIN, _K_MAX = _F(-127.0), _F(128.0)
_HALF, _ONE, _TWO, _ZERO = _F(0.5), _F(1.0), _F(2.0), _F(0.0)
# Taylor coefficients 1/k! of exp on |r| <= ln(2)/2 (truncation error below 5e-9).
_E2, _E3, _E4, _E5, _E6, _E7 = (_F(1.0 / math.factorial(k)) for k in range(2, 8))
# 1/(2k+1) of log1p(e) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = e / (2 + e) <= 1/3.
_L3, _L5, _L7, _L9, _L11, _L13 = (_F(1.0 / k) for k in (3, 5, 7, 9, 11, 13))


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma intrinsic, which reassociation leaves alone)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, a, a), codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


def exp32(x):
    """exp(x) for the kernels (typed by Numba; Python callers get math.exp). In float32: relative
    error below 1e-7 for x in [-87.3, 88.3]; 0 below -87.7 (never a slow subnormal) and inf above 88.4
    (exp(x) > 2.4e38)."""
    return math.exp(x)


@overload(exp32, inline="always")
def _exp32(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def impl(x):
        x = min(max(x, _X_MIN), _X_MAX)                # keeps nan; -inf and inf give 0 and inf
        k = np.floor(x * _LOG2E + _HALF)
        r = _fma(-k, _LN2_LO, _fma(-k, _LN2_HI, x))   # x - k ln 2, |r| <= 0.347
        p = _ONE + r * (_ONE + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * _E7))))))
        # 2**k from its exponent bits, k clamped to [-127, 128]: 2**-127 reads as 0 and 2**128 as inf.
        k = min(max(k, _K_MIN), _K_MAX)
        return p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
    return impl


# 2**f = 1 + f * (P1 + f * (P2 + ...)) on |f| <= 1/2: a degree-6 least-relative-error fit (2e-9).
_P1, _P2, _P3, _P4, _P5, _P6 = (_F(c) for c in (0.6931472028563753, 0.24022647913441988, 0.05550332469052399,
                                                0.009618437370212733, 0.0013398875069152195, 0.000153533600877713))


def pow2(x):
    """2**x for x <= 0, for the scans' decays exp(delta A) = 2**(delta (A log2 e)), A log2 e computed once
    per call (typed by Numba; Python callers get libm). In float32 a degree-6 polynomial on the
    fraction, as mamba-ssm's CUDA scan computes its decays: 14 operations against :func:`exp32`'s
    19, relative error below 1.5e-7; 0 below x = -127 (never a slow subnormal). With the roundings of
    A log2 e and of the product, a decay's relative error stays below 1.5e-7 + 2e-7 |delta A|.
    float64 calls libm's exp."""
    return math.exp(x * LN2)


@overload(pow2, inline="always")
def _pow2(x):
    if x != types.float32:
        return lambda x: math.exp(x * LN2)

    def impl(x):
        x = max(x, _K_MIN)                             # keeps nan; -inf gives 2**-127, read as 0
        k = np.rint(x)
        f = x - k                                      # exact, |f| <= 1/2
        p = _ONE + f * (_P1 + f * (_P2 + f * (_P3 + f * (_P4 + f * (_P5 + f * _P6)))))
        return p * _float32_from_bits((np.int32(min(k, _K_MAX)) + np.int32(127)) << np.int32(23))
    return impl


def softplus(x):
    """log(1 + exp(x)) for the kernels; float32 vectorises, float64 calls libm."""
    return math.log1p(math.exp(x)) if x < 20 else x


@overload(softplus, inline="always")
def _softplus(x):
    if x != types.float32:
        return lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    def impl(x):
        e = exp32(-abs(x))                       # in (0, 1]
        s = e / (_TWO + e)                       # log1p(e) = 2 atanh(s), s <= 1/3
        s2 = s * s
        log1p_e = _TWO * s * (_ONE + s2 * (_L3 + s2 * (_L5 + s2 * (_L7 + s2 * (_L9 + s2 * (_L11 + s2 * _L13))))))
        return max(x, _ZERO) + log1p_e
    return impl


def sigmoid(x):
    """1 / (1 + exp(-x)) for the kernels, in x's dtype. (Numba types a literal 1 as int64, and int64 with
    float32 as float64: written out with a literal in a float32 kernel, it computed in float64, which
    halved the vector width and made the convolution's SiLU loop 1.2x slower.)"""
    return 1 / (1 + math.exp(-x))


@overload(sigmoid, inline="always")
def _sigmoid(x):
    if x != types.float32:
        return lambda x: 1.0 / (1.0 + math.exp(-x))
    return lambda x: _ONE / (_ONE + exp32(-x))


def silu_slope(x, sig):
    """The derivative of silu at x, given sig = sigmoid(x): sig (1 + x (1 - sig)), in x's dtype."""
    return sig * (1 + x * (1 - sig))


@overload(silu_slope, inline="always")
def _silu_slope(x, sig):
    one = _ONE if x == types.float32 else 1.0
    return lambda x, sig: sig * (one + x * (one - sig))


@njit(**JIT_OPTIONS)
def exp_in_kernel(x, out):
    """out[i] = exp32(x[i]), compiled with the kernels' options (tests bound its error with it)."""
    for i in range(x.shape[0]):
        out[i] = exp32(x[i])


@njit(**JIT_OPTIONS)
def pow2_in_kernel(x, out):
    """out[i] = pow2(x[i]), compiled with the kernels' options."""
    for i in range(x.shape[0]):
        out[i] = pow2(x[i])


@njit(**JIT_OPTIONS)
def decay_in_kernel(delta, A, out):
    """out[i] = exp(delta[i] A[i]) as the selective scan's kernels compute it: pow2(delta (A log2 e))."""
    A_log2 = A * A.dtype.type(LOG2E)
    for i in range(delta.shape[0]):
        out[i] = pow2(delta[i] * A_log2[i])


@njit(**JIT_OPTIONS)
def softplus_in_kernel(x, out):
    """out[i] = softplus(x[i]), compiled with the kernels' options."""
    for i in range(x.shape[0]):
        out[i] = softplus(x[i])


# Memory. The arrays the kernels read and write are allocated by NumPy, which asks Linux for
# transparent huge pages (madvise) for arrays from 4 MB on; PyTorch's CPU allocator does not, so the
# first writes to a fresh large tensor of its own fault once per 4 kB page: 105 MB took 36 ms to
# allocate and fill against 11 ms here (2-core EPYC, THP in madvise mode), and the convolution's
# forward pass at batch 2048, length 50 took 121 ms with a PyTorch output against 75 ms. The
# tensors returned share the NumPy arrays' memory.
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def empty(shape, dtype):
    """An uninitialised CPU tensor of ``shape`` and ``dtype`` (float32 or float64) in memory NumPy allocated."""
    return torch.from_numpy(np.empty(shape, _NUMPY_DTYPES[dtype]))


def zeros(shape, dtype):
    """:func:`empty`, zeroed."""
    return empty(shape, dtype).zero_()


def as_array(tensor, dtype):
    """``tensor`` detached, in ``dtype``, contiguous: the tensor itself where it already is, else a copy
    in memory NumPy allocated."""
    tensor = tensor.detach()
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return empty(tensor.shape, dtype).copy_(tensor)


# Threads. The kernels release the GIL (nogil), so plain Python threads run them in parallel; Numba's
# own threading layers are not used, so nothing competes with torch's OpenMP pool (which is idle
# while a kernel runs: its caller waits) and nothing breaks in a forked process.
_pool_lock = threading.Lock()
_pool = None          # (pid, ThreadPoolExecutor), recreated after a fork or a change of size


def _executor(workers):
    global _pool
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool[0] != pid or _pool[1]._max_workers != workers:
            if _pool is not None and _pool[0] == pid:
                _pool[1].shutdown(wait=False)
            _pool = (pid, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recbole-ssm"))
        return _pool[1]


def split(count, parts):
    """``parts`` (at most ``count``) contiguous, near-equal ranges covering range(count), as (start, stop)."""
    parts = max(1, min(parts, count))
    bounds = [count * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_parts(work, ranges):
    """``work(start, stop)`` for each range, on torch's number of threads (``torch.get_num_threads()``);
    the calling thread runs the first range. Returns the results in order."""
    if len(ranges) == 1:
        return [work(*ranges[0])]
    pool = _executor(len(ranges) - 1)
    futures = [pool.submit(work, *r) for r in ranges[1:]]
    first = work(*ranges[0])
    return [first] + [f.result() for f in futures]


def threads():
    """The number of threads the kernels may use: torch's intra-op setting."""
    return torch.get_num_threads()


# Threads of the inference kernels: torch's own OpenMP team. One user's sequence is one row, so
# the thread pool above, which gives each thread whole rows, leaves all but one thread idle (and
# torch's idle OpenMP worker spins, slowing the kernel that runs). A kernel that can also split a
# row's work (heads, channels, positions) runs instead as a Numba C callback (``cfunc``) on the
# team that runs torch's parallel operators, through GNU OpenMP's entry point ``GOMP_parallel``:
# its threads are already awake after torch's last operator, so a call costs about 2 us, where a
# hand-over to a Python thread cost 50-100 us (more than the split saved). The callback reads its
# arguments from one int64 array (packed by :func:`_launch_team`, compiled code too), calls
# ``omp_get_thread_num`` and ``GOMP_barrier`` through their addresses (passed in that array: an
# address compiled in would be stale in the next process, which loads the cached code), and runs
# ``kernel(*arguments, part, parts, barrier)``: the kernel shares its work out by ``part`` of
# ``parts`` and passes ``barrier`` to :func:`wait` between its phases. The split changes results by
# float rounding at most (a channel's arithmetic is the same, but whether it falls in a vector
# loop's body or its remainder may change which multiply-adds are fused). A forked process, where
# the parent's OpenMP threads do not exist (GNU OpenMP then waits for them forever, as torch's own
# operators do), uses the thread pool.
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class _OpenMPTeam:
    """torch's GNU OpenMP runtime, loaded by ctypes from the file torch loaded."""

    def __init__(self, path):
        library = ctypes.CDLL(path)
        self.parallel = ctypes.cast(library.GOMP_parallel, ctypes.c_void_p).value
        self.thread_num = ctypes.cast(library.omp_get_thread_num, ctypes.c_void_p).value
        self.barrier = ctypes.cast(library.GOMP_barrier, ctypes.c_void_p).value


@lru_cache(maxsize=None)
def _torch_openmp_team():
    """The team of torch's OpenMP runtime, or None where torch's operators do not run on GNU OpenMP
    (macOS, Windows, a torch built with another parallel backend)."""
    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libgomp")}
    torch_folder = os.path.dirname(torch.__file__)
    ours = sorted(path for path in loaded if path.startswith(torch_folder)) or sorted(loaded)
    return _OpenMPTeam(ours[0]) if ours else None


def openmp_team():
    """The OpenMP team the kernels can share their work with, or None (see above)."""
    return None if _forked else _torch_openmp_team()


# A team's arguments, packed by :func:`_launch_team` into one int64 array: a header, then a slot per
# argument: an array's address and its dimensions (padded with ones), or a scalar's value (a
# float's bits).
TEAM_HEADER = 3                   # omp_get_thread_num's address, GOMP_barrier's address, parts
TEAM_MAX_DIMS = 5
TEAM_SLOT = 1 + TEAM_MAX_DIMS


def _pack_argument(value, packed, slot):
    """Write ``value`` into ``packed``'s slot starting at ``slot`` (typed by Numba only)."""
    raise NotImplementedError("compiled code only")


@overload(_pack_argument, inline="always")
def _pack_argument_typed(value, packed, slot):
    if isinstance(value, types.Array):
        if value.layout != "C" or value.ndim > TEAM_MAX_DIMS:
            raise TypeError(f"a team argument must be a C-contiguous array of at most {TEAM_MAX_DIMS} "
                            f"dimensions, got {value}")
        ndim = value.ndim

        def pack_array(value, packed, slot):
            packed[slot] = value.ctypes.data
            for d in range(ndim):
                packed[slot + 1 + d] = value.shape[d]
        return pack_array
    if isinstance(value, types.Float):
        return lambda value, packed, slot: _store(packed, slot, _bits_of_float64(value))
    return lambda value, packed, slot: _store(packed, slot, value)


@njit(inline="always", **JIT_OPTIONS)
def _store(packed, slot, value):
    packed[slot] = value


@njit(**JIT_OPTIONS)
def _launch_team(parallel, callback, thread_num, barrier, parts, arguments):
    """``GOMP_parallel`` (at address ``parallel``) of the team callback at address ``callback`` on
    ``parts`` threads, with ``arguments`` (a tuple) packed as the callback reads them."""
    packed = np.ones(TEAM_HEADER + TEAM_SLOT * len(arguments), np.int64)
    packed[0], packed[1], packed[2] = thread_num, barrier, parts
    slot = TEAM_HEADER
    for value in literal_unroll(arguments):
        _pack_argument(value, packed, slot)
        slot += TEAM_SLOT
    _call_parallel(parallel, callback, packed.ctypes.data, parts)


@intrinsic
def _pointer(typingctx, address, dtype):
    """The int64 ``address`` as a pointer to ``dtype``'s values (a NumPy scalar type)."""
    target = types.CPointer(dtype.instance_type)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(target))
    return target(address, dtype), codegen


@intrinsic
def _call_by_address(typingctx, address):
    """Call the C function ``int f(void)`` at ``address``; its result as an int64."""
    def codegen(context, builder, signature, args):
        function = builder.inttoptr(args[0], ir.FunctionType(ir.IntType(32), []).as_pointer())
        return builder.sext(builder.call(function, []), ir.IntType(64))
    return types.int64(address), codegen


@intrinsic
def _call_parallel(typingctx, address, callback, data, parts):
    """Call ``void GOMP_parallel(void (*callback)(void *), void *data, unsigned parts, unsigned flags)``
    at ``address`` (flags 0), the pointers given as int64 addresses."""
    def codegen(context, builder, signature, args):
        pointer = ir.IntType(8).as_pointer()
        unsigned = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [pointer, pointer, unsigned, unsigned])
        function = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(function, [builder.inttoptr(args[1], pointer), builder.inttoptr(args[2], pointer),
                                builder.trunc(args[3], unsigned), unsigned(0)])
        return context.get_dummy_value()
    return types.void(address, callback, data, parts), codegen


@intrinsic
def _float64_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _bits_of_float64(typingctx, value):
    def codegen(context, builder, signature, args):
        double = args[0] if signature.args[0] == types.float64 else builder.fpext(args[0], ir.DoubleType())
        return builder.bitcast(double, ir.IntType(64))
    return types.int64(value), codegen


@njit(inline="always", **JIT_OPTIONS)
def team_array(packed, i, dtype):
    """Argument ``i`` of the packed array (:func:`_launch_team`) as a flat array of ``dtype``; reshape it with
    :func:`team_shape` (booleans: read as ``np.uint8`` and viewed as ``np.bool_``)."""
    slot = TEAM_HEADER + TEAM_SLOT * i
    size = packed[slot + 1] * packed[slot + 2] * packed[slot + 3] * packed[slot + 4] * packed[slot + 5]
    return carray(_pointer(packed[slot], dtype), (size,))


@njit(inline="always", **JIT_OPTIONS)
def team_floats(packed, i):
    """Argument ``i`` of a float32 team callback as a flat float32 array (see :func:`team_array`)."""
    return team_array(packed, i, np.float32)


@njit(inline="always", **JIT_OPTIONS)
def team_shape(packed, i):
    """Argument ``i``'s dimensions, padded with ones to five: slice the tuple to the array's rank."""
    slot = TEAM_HEADER + TEAM_SLOT * i
    return packed[slot + 1], packed[slot + 2], packed[slot + 3], packed[slot + 4], packed[slot + 5]


@njit(inline="always", **JIT_OPTIONS)
def team_scalar(packed, i):
    return packed[TEAM_HEADER + TEAM_SLOT * i]


@njit(inline="always", **JIT_OPTIONS)
def team_float(packed, i):
    return _float64_from_bits(packed[TEAM_HEADER + TEAM_SLOT * i])


@njit(inline="always", **JIT_OPTIONS)
def team_member(packed):
    """(part, parts, barrier) of the thread running a team callback."""
    return _call_by_address(packed[0]), packed[2], packed[1]


@njit(inline="always", **JIT_OPTIONS)
def wait(barrier):
    """Wait for the whole team (``barrier`` from :func:`team_member`), or nothing outside a team (0)."""
    if barrier:
        _call_by_address(barrier)


@njit(inline="always", **JIT_OPTIONS)
def share(count, part, parts):
    """Part ``part`` of ``parts`` near-equal contiguous ranges of range(count): (start, stop)."""
    return count * part // parts, count * (part + 1) // parts


@lru_cache(maxsize=None)
def _team_callback(unpack):
    """``unpack(data)`` compiled as a C function ``void f(int64 *data)`` (on first use; cached on disk)."""
    options = {key: value for key, value in JIT_OPTIONS.items() if key != "cache"}
    return cfunc(types.void(types.CPointer(types.int64)), cache=True, **options)(unpack)


def run_team(kernel, unpack, arguments, rows):
    """``kernel(*arguments, part, parts, barrier)`` for every part, on torch's number of threads.

    Where torch's OpenMP team is available, on that team: ``unpack`` is the kernel's team callback,
    a plain function ``unpack(data)`` (compiled here as a ``cfunc``) that reads the arguments from
    ``data``, the packed int64 array (:func:`team_array`, :func:`team_shape`, ...), and calls the
    kernel with :func:`team_member`'s part, parts and barrier; the kernel takes whole rows when there
    are at least as many ``rows`` as parts, else shares out each row's work. Otherwise, and for
    float64 (the reference precision, kept off the callbacks so that they compile once), the
    kernel's parts are whole rows (at most one per row) on the thread pool, with no barrier (0).
    (Inference of 8 users at L = 200, two threads: the SSM models' calls took 26-32% less time on
    the team than on the thread pool, which also lost to torch's spinning OpenMP threads.)"""
    parts = threads()
    team = openmp_team() if 1 < parts else None
    if team is not None and all(a.dtype != np.float64 for a in arguments if isinstance(a, np.ndarray)):
        _launch_team(team.parallel, _team_callback(unpack).address, team.thread_num, team.barrier, parts,
                     tuple(arguments))
        return
    parts = max(1, min(parts, rows))
    run_parts(lambda part, _: kernel(*arguments, part, parts, 0), [(part, part + 1) for part in range(parts)])
