"""What the compiled kernels share: their exp and softplus, threads, loading, fallback and cache."""
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from numba import carray, njit

from recbole_ssm.ops import compiled
from recbole_ssm.ops.selective_scan import selective_scan
from tests.selective_scan_reference import random_inputs, recurrence

# On the import path of the scripts that import tests.*: they run in the test's own folder.
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def float32_grid(low, high, count=2_000_001):
    return np.linspace(low, high, count, dtype=np.float32)


def test_exp_error_bound_inside_a_kernel():
    # Compiled with the kernels' fastmath flags, which once folded a split ln 2 back into one
    # float32 constant (3e-7): the bound below fails for that version.
    x = float32_grid(-87.3, 88.3)
    got = np.empty_like(x)
    compiled.exp_in_kernel(x, got)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(got - exact) / exact).max() < 1e-7


def test_pow2_error_bound_inside_a_kernel():
    x = float32_grid(-126, 0)
    got = np.empty_like(x)
    compiled.pow2_in_kernel(x, got)
    exact = np.exp2(x.astype(np.float64))
    assert (np.abs(got - exact) / exact).max() < 1.5e-7
    edges = np.array([-1e30, -127.5, -np.inf, np.nan, 0.0], dtype=np.float32)
    got = np.empty_like(edges)
    compiled.pow2_in_kernel(edges, got)
    np.testing.assert_array_equal(got[:3], 0)                       # never a (slow) subnormal
    assert np.isnan(got[3]) and got[4] == 1


def test_decay_error_bound_inside_a_kernel():
    # The selective scan's decays exp(delta * A), delta > 0 and A < 0, as its kernels compute them:
    # relative error 1.5e-7 + 2e-7 |delta A| (pow2's, and the roundings of A log2 e and of the product),
    # so an absolute error below 1.5e-7 exp(x) + 8e-8.
    gen = np.random.default_rng(0)
    delta = np.exp(gen.uniform(-9, 2, 2_000_000)).astype(np.float32)
    A = -np.exp(gen.uniform(-3, 4, 2_000_000)).astype(np.float32)
    got = np.empty_like(delta)
    compiled.decay_in_kernel(delta, A, got)
    x = delta.astype(np.float64) * A.astype(np.float64)
    keep = x > -87                                                   # below: 0 or a subnormal
    exact = np.exp(x[keep])
    error = np.abs(got[keep] - exact)
    assert (error / exact / (1.5e-7 + 2e-7 * np.abs(x[keep]))).max() < 1
    assert (error - 1.5e-7 * exact).max() < 8e-8
    assert (got[~keep] < 2e-38).all()
    assert np.abs(x).max() > 300 and np.abs(x).min() < 1e-3       # the range covered


def test_exp_at_the_edges():
    x = np.array([-1e30, -200, -88.0, 89.0, 1e30, -np.inf, np.inf, np.nan, 0.0], dtype=np.float32)
    got = np.empty_like(x)
    compiled.exp_in_kernel(x, got)
    np.testing.assert_array_equal(got[:3], 0)                       # never a (slow) subnormal
    assert np.isposinf(got[3:5]).all() and got[5] == 0 and np.isposinf(got[6]) and np.isnan(got[7])
    assert got[8] == 1
    float64 = np.array([-700.0, -1.5, 0.0, 3.0])
    got64 = np.empty_like(float64)
    compiled.exp_in_kernel(float64, got64)
    np.testing.assert_array_equal(got64, np.exp(float64))            # float64 calls libm


def test_softplus_error_bound():
    x = float32_grid(-80, 80)
    got = np.empty_like(x)
    compiled.softplus_in_kernel(x, got)
    exact = np.logaddexp(0, x.astype(np.float64))        # log(1 + exp(x)), without a threshold
    assert (np.abs(got - exact) / exact).max() < 3e-7
    x64 = x.astype(np.float64)
    got64 = np.empty_like(x64)
    compiled.softplus_in_kernel(x64, got64)
    np.testing.assert_allclose(got64, exact, rtol=1e-14, atol=0)


@pytest.mark.parametrize("count, parts", [(10, 3), (2, 5), (1, 1), (7, 7)])
def test_split_covers_the_range(count, parts):
    ranges = compiled.split(count, parts)
    assert len(ranges) == min(count, parts)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(count))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_arrays_in_numpy_memory():
    """The kernels' arrays: NumPy-allocated tensors; a contiguous tensor of the right dtype is used as it
    is, anything else is copied (values and dtype converted) into such memory."""
    fresh = compiled.empty((3, 4), torch.float64)
    assert fresh.shape == (3, 4) and fresh.dtype == torch.float64
    assert compiled.zeros((2, 5), torch.float32).eq(0).all()
    tensor = torch.randn(4, 6, requires_grad=True)
    same = compiled.as_array(tensor, torch.float32)
    assert same.data_ptr() == tensor.data_ptr() and not same.requires_grad
    for other in (tensor.t(), tensor.double()):
        copy = compiled.as_array(other, torch.float32)
        assert copy.data_ptr() != other.data_ptr() and copy.is_contiguous() and copy.dtype == torch.float32
        torch.testing.assert_close(copy, other.detach().float(), rtol=0, atol=0)


def test_run_parts_uses_torch_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert compiled.threads() == 3
        names = compiled.run_parts(lambda a, b: (a, b, __import__("threading").current_thread().name),
                                   compiled.split(9, compiled.threads()))
    finally:
        torch.set_num_threads(threads)
    assert [n[:2] for n in names] == [(0, 3), (3, 6), (6, 9)]
    assert names[0][2] == "MainThread" and all(n[2].startswith("recbole-ssm") for n in names[1:])


def _scan_in_child(queue):
    torch.set_num_threads(2)
    inputs = random_inputs(batch=4, length=9)
    got = selective_scan(**inputs, delta_softplus=True, backend="numba")
    queue.put(float((got - recurrence(**inputs, delta_softplus=True)).abs().max()))


def test_forked_process_runs_the_kernels_on_threads():
    """A process forked after the parent used the thread pool (as DataLoader workers are) runs the
    kernels on threads of its own instead of waiting for the parent's."""
    result = in_forked_child(lambda: selective_scan(**random_inputs(batch=4, length=9), delta_softplus=True,
                                                    backend="numba"), _scan_in_child)
    assert result < 1e-10


def in_forked_child(parent_call, child_target, timeout=300):
    """What ``child_target(queue)`` puts on its queue in a process forked after ``parent_call()`` ran
    on two threads; fails if the child hangs or exits with an error."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parent_call()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=child_target, args=(queue,))
        child.start()
        child.join(timeout=timeout)
    finally:
        torch.set_num_threads(threads)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked process hung in the compiled kernels")
    assert child.exitcode == 0
    return queue.get(timeout=5)


@njit(cache=True)
def _parts_and_barrier(seen, after_barrier, part, parts, barrier):
    """A team kernel for the tests: each part marks itself in ``seen``, waits for the others, then
    copies what every part marked into its row of ``after_barrier``."""
    seen[part] = part + 1
    compiled.wait(barrier)
    after_barrier[part, :] = seen


def _parts_and_barrier_in_team(data):
    packed = carray(data, (compiled.TEAM_HEADER + compiled.TEAM_SLOT * 2,))
    part, parts, barrier = compiled.team_member(packed)
    _parts_and_barrier(compiled.team_array(packed, 0, np.int64),
                       compiled.team_array(packed, 1, np.int64).reshape(compiled.team_shape(packed, 1)[:2]),
                       part, parts, barrier)


def run_parts_and_barrier(threads, rows):
    """(seen, after_barrier) of :func:`_parts_and_barrier` run by ``run_team`` on ``threads`` threads."""
    seen, after = np.zeros(threads, np.int64), np.zeros((threads, threads), np.int64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled.run_team(_parts_and_barrier, _parts_and_barrier_in_team, (seen, after), rows)
    finally:
        torch.set_num_threads(previous)
    return seen, after


@pytest.mark.parametrize("threads,rows", [(2, 1), (3, 1), (3, 5)])
def test_parts_run_on_torchs_openmp_team_with_barriers(threads, rows, record_calls):
    """On Linux (torch's parallel backend there is GNU OpenMP, which CI must have), every part runs on
    torch's OpenMP team, with fewer rows than threads or more, and no part passes the barrier before
    every part has reached it."""
    assert sys.platform.startswith("linux") and compiled.openmp_team() is not None, (
        "torch's OpenMP runtime was not found: " + torch.__config__.parallel_info())
    launches = record_calls(compiled, "_launch_team")
    seen, after = run_parts_and_barrier(threads, rows)
    everyone = np.arange(1, threads + 1)
    assert len(launches) == 1
    np.testing.assert_array_equal(seen, everyone)
    np.testing.assert_array_equal(after, np.tile(everyone, (threads, 1)))


def test_without_the_team_parts_are_whole_rows_on_the_thread_pool(monkeypatch, record_calls):
    """float64 arguments, or no team (a forked process): parts are whole rows, at most one per row,
    with no barrier, on the thread pool."""
    launches = record_calls(compiled, "_launch_team")
    seen64 = np.zeros(2, np.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled.run_team(lambda values, part, parts, barrier: values.__setitem__(part, parts), None, (seen64,), 1)
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(seen64, [1, 0])      # one row: one part
    monkeypatch.setattr(compiled, "_forked", True)
    assert compiled.openmp_team() is None
    seen, after = run_parts_and_barrier(3, rows=2)
    np.testing.assert_array_equal(seen, [1, 2, 0])
    seen, after = run_parts_and_barrier(3, rows=3)
    np.testing.assert_array_equal(seen, [1, 2, 3])
    assert launches == []


def _team_mixer_in_child(queue):
    from recbole_ssm.ops.ssd_mixer import ssd_mixer_no_grad
    from tests.modules.test_ssd_mixer import mixer_inputs

    inputs = mixer_inputs(batch=1)
    torch.set_num_threads(1)
    one = ssd_mixer_no_grad(**inputs)
    torch.set_num_threads(2)
    queue.put((compiled.openmp_team() is None, float((ssd_mixer_no_grad(**inputs) - one).abs().max())))


def test_forked_process_does_not_use_the_parents_openmp_team():
    """After the parent ran a kernel on torch's OpenMP team, a forked process (where GNU OpenMP would
    wait forever for the parent's threads) runs the kernels without it, and gets the same result."""
    from recbole_ssm.ops.ssd_mixer import ssd_mixer_no_grad
    from tests.modules.test_ssd_mixer import mixer_inputs

    assert in_forked_child(lambda: ssd_mixer_no_grad(**mixer_inputs(batch=1)), _team_mixer_in_child) == (True, 0.0)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_numba_is_imported_on_first_use_only():
    result = run_python("""
        import sys, torch
        import recbole_ssm
        from recbole_ssm.modules.mamba import MambaBlock
        block = MambaBlock(8, d_state=4)
        assert "numba" not in sys.modules, "imported with the package"
        block(torch.randn(2, 5, 8))
        assert "numba" in sys.modules
    """)
    assert result.returncode == 0, result.stderr


def test_without_numba_auto_warns_once_and_numba_fails_clearly():
    result = run_python("""
        import sys, warnings
        sys.modules["numba"] = None        # as if Numba were not installed
        import torch
        from recbole_ssm.ops.selective_scan import selective_scan
        from recbole_ssm.ops.ssd import ssd_scan
        from tests.selective_scan_reference import random_inputs, recurrence
        inputs = random_inputs(length=9)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = selective_scan(**inputs, delta_softplus=True)
            selective_scan(**inputs, delta_softplus=True)
            x = torch.randn(1, 4, 2, 3); dt = torch.rand(1, 4, 2); A = -torch.rand(2)
            ssd_scan(x, dt, A, torch.randn(1, 4, 1, 5), torch.randn(1, 4, 1, 5), 2)
        assert (got - recurrence(**inputs, delta_softplus=True)).abs().max() < 1e-10
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, messages
        assert "compiled CPU kernels are not available" in messages[0] and "pip install numba" in messages[0]
        try:
            selective_scan(**inputs, backend="numba")
        except RuntimeError as error:
            assert "ssm backend 'numba' is not available" in str(error), error
        else:
            raise AssertionError("backend numba ran without Numba")
        print("ok")
    """, PYTHONPATH=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_numba_backend_refuses_other_devices():
    inputs = {k: v.to("meta") for k, v in random_inputs(length=3).items()}
    with pytest.raises(RuntimeError, match="'numba' runs on the CPU, got a tensor on meta"):
        selective_scan(**inputs, backend="numba")


def test_kernels_are_cached_on_disk(tmp_path):
    """Compiled once, loaded from NUMBA_CACHE_DIR afterwards (Numba's own choice without it: next to
    the sources when writable, else a per-user folder)."""
    code = """
        import torch
        from recbole_ssm.ops.selective_scan import selective_scan
        from recbole_ssm.ops.selective_scan import fused_recurrent
        from tests.selective_scan_reference import random_inputs
        with torch.no_grad():
            selective_scan(**random_inputs(length=5, dtype=torch.float32), backend="numba")
        print(len(fused_recurrent._forward.stats.cache_hits))
    """
    first = run_python(code, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=REPO_ROOT)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[-1] == "0"
    assert any(name.endswith(".nbi") for _, _, files in os.walk(tmp_path) for name in files)
    second = run_python(code, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=REPO_ROOT)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[-1] == "1"   # the kernel came from the cache


def test_float32_kernels_vectorise_in_float32(tmp_path):
    """No float32 kernel's loop computes in float64 (Numba types a literal 1 as int64, and int64 with
    float32 as float64: written that way, the convolution's SiLU loop ran on half-width float64
    vectors). Every kernel is compiled afresh (an empty NUMBA_CACHE_DIR: cached code shows no IR)
    through the ops and blocks, with and without gradients, and its LLVM IR searched for vector
    arithmetic on doubles. (Per-row scalars, such as the norm's 1/sqrt(mean square + eps), may be
    float64.)"""
    result = run_python("""
        import re
        import torch
        from recbole_ssm.modules.hydra import HydraBlock
        from recbole_ssm.modules.mamba import MambaBlock
        from recbole_ssm.modules.mamba2 import Mamba2Block
        from recbole_ssm.ops.conv import fused as conv
        from recbole_ssm.ops.gated_rmsnorm import fused as norm
        from recbole_ssm.ops.selective_scan import fused_recurrent as selective_scan
        from recbole_ssm.ops.ssd import fused_recurrent as ssd
        from recbole_ssm.ops.ssd_mixer import fused as ssd_mixer
        torch.manual_seed(0)
        for block in (MambaBlock(16, d_state=4, backend="numba"),
                      Mamba2Block(16, d_state=8, headdim=8, backend="numba"),
                      HydraBlock(16, d_state=8, headdim=8, backend="numba")):
            x = torch.randn(2, 9, 16, requires_grad=True)
            block(x).sum().backward()
            with torch.no_grad():
                block(x)
        vector_double = re.compile(r"= (?:fadd|fsub|fmul|fdiv|fneg|fpext)[^\\n]*<\\d+ x double>")
        checked = 0
        for module in (conv, norm, selective_scan, ssd, ssd_mixer):
            for name, kernel in vars(module).items():
                for signature in getattr(kernel, "signatures", ()):
                    if "float32" in str(signature):
                        checked += 1
                        found = vector_double.findall(kernel.inspect_llvm(signature))
                        assert not found, (module.__name__, name, found[:3])
        print(checked)
    """, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 12   # every kernel above, in float32
