"""The CUDA dispatch, run on the CPU through stand-ins for mamba-ssm's and causal-conv1d's kernels
(tests/cuda_standins.py), which check every call against the real kernels' preconditions.

What only a GPU run can add (the GPU-readiness issue plans it as tests/gpu): the kernels' own
arithmetic, and that the real modules load.
"""
import configparser
import copy
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from recbole.utils import get_model

from recbole_ssm.modules.hydra import HydraBlock
from recbole_ssm.modules.mamba import MambaBlock
from recbole_ssm.modules.mamba2 import Mamba2Block
from recbole_ssm.ops.conv import depthwise_conv1d
from recbole_ssm.ops.gated_rmsnorm import gated_rmsnorm
from recbole_ssm.ops.hydra import hydra_mixer
from recbole_ssm.ops.selective_scan import selective_scan
from recbole_ssm.ops.ssd import ssd_scan
from tests import cuda_standins
from tests.conftest import MODELS
from tests.cuda_standins import KernelContractError
from tests.selective_scan_reference import random_inputs

CONV, SCAN, SSD, NORM = "causal_conv1d_fn", "selective_scan_fn", "mamba_chunk_scan_combined", "rmsnorm_fn"


@pytest.fixture
def kernels(monkeypatch):
    """kernels(absent=()) installs the stand-ins (modules in ``absent`` fail to import) and returns the
    record of their calls."""
    yield lambda absent=(): cuda_standins.install(monkeypatch, absent)
    cuda_standins.reset_caches()


def our_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("recbole-ssm")]


def conv_inputs(channels, width=4, length=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(channels, 1, width, generator=g, dtype=dtype)
    bias = torch.randn(channels, generator=g, dtype=dtype)
    return weight, bias


# ------------------------------------------------------------ the stand-ins reject what the kernels reject

def test_conv_standin_rejects_what_causal_conv1d_rejects():
    weight, bias = conv_inputs(100)
    channel_last_100 = torch.randn(2, 9, 200).transpose(1, 2)[:, :100]    # strides (1800, 1, 200)
    with pytest.raises(KernelContractError, match="divisible by 8"):
        cuda_standins.causal_conv1d_fn(channel_last_100, weight[:, 0], bias, activation="silu")
    odd_stride = torch.randn(2, 9, 20).transpose(1, 2)[:, :16]            # dim 16, stride(2) 20
    with pytest.raises(KernelContractError, match="multiples of 8"):
        cuda_standins.causal_conv1d_fn(odd_stride, weight[:16, 0], bias[:16])
    x = torch.randn(2, 16, 9)
    with pytest.raises(KernelContractError, match="width between 2 and 4"):
        cuda_standins.causal_conv1d_fn(x, torch.randn(16, 5), bias[:16])
    with pytest.raises(KernelContractError, match="float32, float16 or bfloat16"):
        cuda_standins.causal_conv1d_fn(x.double(), weight[:16, 0].double(), bias[:16].double())
    with pytest.raises(KernelContractError, match="bias type"):
        cuda_standins.causal_conv1d_fn(x, weight[:16, 0], bias[:16].half())
    misaligned = torch.randn(2 * 16 * 8 + 2)[2:].view(2, 16, 8)          # starts 8 bytes into a block
    with pytest.raises(KernelContractError, match="16 bytes"):
        cuda_standins.causal_conv1d_fn(misaligned, weight[:16, 0], bias[:16])
    # The backward kernel's stride rule, on a gradient that stays channel-last with stride(2) 20:
    leaf = torch.randn(2, 9, 16).requires_grad_()
    out = cuda_standins.causal_conv1d_fn(leaf.transpose(1, 2), weight[:16, 0], bias[:16])
    with pytest.raises(KernelContractError, match="dout.stride"):
        out.backward(torch.randn(2, 9, 20).transpose(1, 2)[:, :16])


def test_scan_standin_rejects_what_selective_scan_rejects():
    inputs = random_inputs(n=4, dtype=torch.float32)
    inputs.update(A=inputs["A"].float(), D=inputs["D"].float(), delta_bias=inputs["delta_bias"].float())
    cuda_standins.selective_scan_fn(**inputs)                                # accepted as it is
    with pytest.raises(KernelContractError, match="state dimension <= 256"):
        cuda_standins.selective_scan_fn(**random_inputs(n=257, length=3, dtype=torch.float32)
                                        | {"A": -torch.ones(5, 257), "D": None, "delta_bias": None, "z": None})
    with pytest.raises(KernelContractError, match="delta type"):
        cuda_standins.selective_scan_fn(**inputs | {"u": inputs["u"].bfloat16(), "z": None})
    with pytest.raises(KernelContractError, match="float32, float16 or bfloat16"):
        cuda_standins.selective_scan_fn(**{k: v.double() for k, v in inputs.items()} | {"A": inputs["A"]})
    with pytest.raises(KernelContractError, match="D must be float32"):
        cuda_standins.selective_scan_fn(**inputs | {"D": inputs["D"].double()})


def test_ssd_and_norm_standins_reject_what_the_triton_kernels_reject():
    b, l, h, p, g, n = 2, 6, 4, 3, 2, 5
    x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h)
    A, B, C = -torch.rand(h), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    cuda_standins.mamba_chunk_scan_combined(x, dt, A, B, C, 4)              # accepted as it is
    with pytest.raises(KernelContractError, match="dt.shape"):
        cuda_standins.mamba_chunk_scan_combined(x, dt[:, :, :2], A, B, C, 4)
    with pytest.raises(KernelContractError, match="nheads % ngroups"):
        cuda_standins.mamba_chunk_scan_combined(x[:, :, :3], dt[:, :, :3], A[:3], B, C, 4)
    with pytest.raises(KernelContractError, match="D.shape"):
        cuda_standins.mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=torch.ones(p))
    with pytest.raises(KernelContractError, match="float32 at most"):
        cuda_standins.mamba_chunk_scan_combined(x.double(), dt, A, B.double(), C.double(), 4)
    y, z, weight = torch.randn(b, l, 12), torch.randn(b, l, 12), torch.ones(12)
    cuda_standins.rmsnorm_fn(y, weight, None, z=z, eps=1e-5, group_size=6)  # accepted as it is
    with pytest.raises(KernelContractError, match="z.shape"):
        cuda_standins.rmsnorm_fn(y, weight, None, z=z[..., :6])
    with pytest.raises(KernelContractError, match="N % group_size"):
        cuda_standins.rmsnorm_fn(y, weight, None, z=z, group_size=5)
    with pytest.raises(KernelContractError, match="computes in float32"):
        cuda_standins.rmsnorm_fn(y.double(), weight, None)


# ------------------------------------------------------------ each op's dispatch

def assert_falls_back(op, name, reason):
    """op(backend), the op called ``name``, under "auto" warns with ``reason`` (a regex) and computes
    what "torch" does; under "cuda" it fails with ``reason``."""
    with pytest.warns(RuntimeWarning, match=f"the {name} runs in PyTorch on the GPU.*{reason}"):
        got = op("auto")
    torch.testing.assert_close(got, op("torch"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"ssm backend 'cuda' cannot run the {name} with .*{reason}"):
        op("cuda")


def in_proj_output(width, batch=2, length=9):
    """A (batch, length, width) activation, as a linear projection leaves it."""
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", ["mamba1 d_inner 128", "mamba1 d_inner 100", "mamba2 without mask",
                                  "misaligned", "sequence-major"])
def test_conv_takes_or_copies_the_layout(kernels, case):
    """Finding 1 and 2: a channel-last view that breaks causal-conv1d's rules is copied first."""
    calls = kernels()
    x, in_place = {
        # Mamba-1: x is the first half of in_proj's output, transposed: strides (l * 2d, 1, 2d)
        "mamba1 d_inner 128": (in_proj_output(256).transpose(1, 2)[:, :128], True),
        "mamba1 d_inner 100": (in_proj_output(200).transpose(1, 2)[:, :100], False),
        # Mamba-2 defaults at d_model 64 (d_state 128, 2 heads): xBC of 384 channels in a 514-wide row
        "mamba2 without mask": (in_proj_output(514).transpose(1, 2)[:, 128:512], False),
        "misaligned": (in_proj_output(130).transpose(1, 2)[:, 2:130], False),  # starts 8 bytes in
        "sequence-major": (in_proj_output(20).transpose(1, 2).contiguous(), True),  # (b, d, l) contiguous
    }[case]
    weight, bias = conv_inputs(x.shape[1])
    x.requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = depthwise_conv1d(x, weight, bias, backend="cuda")
    assert calls.counts[CONV] == 1 and not our_warnings(caught)
    passed = calls.args[CONV][0][0]
    assert (passed.data_ptr() == x.data_ptr()) == in_place
    expected = depthwise_conv1d(x, weight, bias, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.square().sum().backward()  # through the backward kernel's stride check
    assert x.grad is not None


@pytest.mark.parametrize("width", [1, 5])
def test_conv_width_outside_2_to_4(kernels, width):
    """Finding 3: auto falls back with one warning; cuda says which requirement is not met."""
    calls = kernels()
    x = in_proj_output(64).transpose(1, 2)
    weight, bias = conv_inputs(64, width)
    assert_falls_back(lambda backend: depthwise_conv1d(x, weight, bias, backend=backend), "causal convolution",
                      f"causal_conv1d_fn: the convolution width \\(d_conv\\) is {width}; the kernel supports 2 to 4")
    assert not calls.counts


def test_float64_runs_in_pytorch_under_auto_and_fails_under_cuda(kernels):
    """Finding 7: no kernel is handed float64."""
    calls = kernels()
    x = in_proj_output(16).double().transpose(1, 2)
    weight, bias = conv_inputs(16, dtype=torch.float64)
    inputs = random_inputs(dtype=torch.float64)
    b, l, h, p, g, n = 2, 6, 4, 3, 2, 5
    ssd_args = (torch.randn(b, l, h, p).double(), torch.rand(b, l, h).double(), -torch.rand(h).double(),
                torch.randn(b, l, g, n).double(), torch.randn(b, l, g, n).double(), 4)
    y, z = torch.randn(b, l, 12).double(), torch.randn(b, l, 12).double()
    ops = {
        "causal convolution": lambda backend: depthwise_conv1d(x, weight, bias, backend=backend),
        "selective scan": lambda backend: selective_scan(**inputs, delta_softplus=True, backend=backend),
        "SSD scan": lambda backend: ssd_scan(*ssd_args, backend=backend),
        "gated RMSNorm": lambda backend: gated_rmsnorm(y, torch.ones(12).double(), z, backend=backend),
    }
    for name, op in ops.items():
        assert_falls_back(op, name, "is torch.float64; the kernel takes float32, float16 or bfloat16")
    assert not calls.counts


def test_selective_scan_state_size_and_dtypes(kernels):
    """Finding 8: d_state above 256 runs in PyTorch under auto and fails under cuda; u, delta, B, C and
    z must share one dtype."""
    calls = kernels()
    inputs = random_inputs(n=300, length=5, dtype=torch.float32)
    assert_falls_back(lambda backend: selective_scan(**inputs, backend=backend), "selective scan",
                      "d_state is 300; the kernel supports at most 256")
    mixed = random_inputs(n=4, dtype=torch.float32) | {"z": None}
    mixed["u"] = mixed["u"].bfloat16()
    with pytest.raises(RuntimeError, match="delta is torch.float32 and u is torch.bfloat16"):
        selective_scan(**mixed, backend="cuda")
    assert not calls.counts


def test_compiled_scan_missing_behind_an_importable_module(kernels):
    """Finding 6: mamba-ssm's main branch imports without selective_scan_cuda and fails only when
    called; the loader checks the extension itself. The Triton kernels still run there."""
    calls = kernels(absent=("selective_scan_cuda",))
    inputs = random_inputs(n=4, length=6, dtype=torch.float32)
    assert_falls_back(lambda backend: selective_scan(**inputs, backend=backend), "selective scan",
                      "compiled extension selective_scan_cuda does not.*MAMBA_KEEP_CUDA_BUILD")
    y = torch.randn(2, 3, 8)
    gated_rmsnorm(y, torch.ones(8), y, backend="cuda")
    assert calls.counts == {NORM: 1}


def test_missing_packages_are_not_silent(kernels):
    """Finding 5: releases up to v2.3.2.post1 import nothing of mamba-ssm without its compiled
    extension; auto then says once per op that it runs PyTorch on the GPU."""
    calls = kernels(absent=(*cuda_standins.MAMBA_SSM_MODULES, *cuda_standins.EXTENSIONS, "causal_conv1d"))
    y = torch.randn(2, 3, 8)
    with pytest.warns(RuntimeWarning, match="gated RMSNorm runs in PyTorch on the GPU.*did not import"):
        gated_rmsnorm(y, torch.ones(8), y, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated_rmsnorm(y, torch.ones(8), y, backend="auto")
    assert not our_warnings(caught)  # once
    with pytest.raises(RuntimeError, match=r"install recbole-ssm\[cuda\] \(mamba-ssm\)"):
        gated_rmsnorm(y, torch.ones(8), y, backend="cuda")
    assert not calls.counts


def test_cuda_extra_admits_only_the_checked_versions():
    """Finding 6: the [cuda] extra takes the releases whose sources ops/*/cuda.py were written from,
    and not the next mamba-ssm release, whose compiled selective scan is built only on request."""
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parents[2] / "setup.cfg")
    extra = {r.name: r.specifier for r in map(Requirement, setup["options.extras_require"]["cuda"].split("\n")[1:])}
    checked = {"mamba-ssm": ("2.2.0", "2.2.6.post3", "2.3.2.post1"), "causal-conv1d": ("1.4.0", "1.6.1", "1.7.0")}
    unchecked = {"mamba-ssm": ("2.1.0", "2.3.3", "2.4.0"), "causal-conv1d": ("1.3.0", "1.8.0")}
    assert set(extra) == set(checked)
    for package, specifier in extra.items():
        assert all(specifier.contains(v, prereleases=True) for v in checked[package]), package
        assert not any(specifier.contains(v, prereleases=True) for v in unchecked[package]), package


def test_pytorch_ops_keep_the_input_dtype_under_autocast():
    """Finding 4: under autocast every op's PyTorch path returns its input's dtype, as the kernels do
    (bfloat16 activations, float32 parameters)."""
    bf16 = torch.bfloat16
    weight, bias = conv_inputs(16)
    inputs = random_inputs(n=4, dtype=torch.float32)
    inputs.update({k: inputs[k].to(bf16) for k in ("u", "delta", "B", "C", "z")})
    b, l, h, p, g, n = 2, 6, 4, 3, 2, 5
    x, dt = torch.randn(b, l, h, p).to(bf16), torch.rand(b, l, h)
    B, C = torch.randn(b, l, g, n).to(bf16), torch.randn(b, l, g, n).to(bf16)
    y = torch.randn(b, l, 12).to(bf16)
    with torch.autocast("cpu", dtype=bf16):
        outputs = {
            "conv": depthwise_conv1d(in_proj_output(16).to(bf16).transpose(1, 2), weight, bias, backend="torch"),
            "selective scan": selective_scan(**inputs, delta_softplus=True, backend="torch"),
            "ssd": ssd_scan(x, dt, -torch.rand(h), B, C, 4, D=torch.ones(h), backend="torch"),
            "hydra": hydra_mixer(x, dt, dt, -torch.rand(h), B, C, B, C, torch.ones(h), 4, backend="torch"),
            "gated rmsnorm": gated_rmsnorm(y, torch.ones(12), y, backend="torch"),
        }
    assert {name: out.dtype for name, out in outputs.items()} == dict.fromkeys(outputs, bf16)


# ------------------------------------------------------------ the blocks and models, end to end

BLOCKS = {
    "mamba hidden 64": (lambda: MambaBlock(64, d_state=16), {CONV: 1, SCAN: 1}),
    "mamba hidden 50": (lambda: MambaBlock(50, d_state=16), {CONV: 1, SCAN: 1}),
    "mamba d_conv 2": (lambda: MambaBlock(64, d_state=16, d_conv=2), {CONV: 1, SCAN: 1}),
    "mamba2 module defaults": (lambda: Mamba2Block(64), {CONV: 1, SSD: 1, NORM: 1}),
    "mamba2 ngroups 2": (lambda: Mamba2Block(64, d_state=16, headdim=16, ngroups=2, chunk_size=4),
                         {CONV: 1, SSD: 1, NORM: 1}),
    "mamba2 hidden 50": (lambda: Mamba2Block(50, d_state=12, headdim=10, ngroups=2, d_conv=2, chunk_size=4),
                         {CONV: 1, SSD: 1, NORM: 1}),
    "hydra defaults": (lambda: HydraBlock(64, d_state=32, headdim=16, chunk_size=64), {SSD: 1, NORM: 1}),
    "hydra hidden 50": (lambda: HydraBlock(50, d_state=12, headdim=10, ngroups=2, d_conv=3, chunk_size=4),
                        {SSD: 1, NORM: 1}),
}
SETTINGS = ["float32", "float32 masked", "autocast bfloat16 masked"]


def with_backend(module, backend):
    """A copy of ``module`` whose blocks and norms use ``backend``."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return module


def run(block, setting, batch=3, length=11):
    """(output, gradients of the input and the parameters) of ``block`` on a fixed input."""
    g = torch.Generator().manual_seed(2)
    u = torch.randn(batch, length, block.d_model, generator=g, dtype=next(block.parameters()).dtype)
    u.requires_grad_()
    mask = None
    if "masked" in setting:
        mask = torch.arange(length) < torch.tensor([length, 7, 1])[:, None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in setting):
        y = block(u, mask)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, [u.grad] + [p.grad for p in block.parameters()]


def assert_same_run(got, expected):
    """The stand-ins compute with the PyTorch path's own functions, on copies in other layouts: the
    results agree to float32 rounding, under autocast too (measured: 0 to 2e-7 relative)."""
    assert got[0].dtype == expected[0].dtype
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", BLOCKS)
def test_blocks_through_the_kernels_equal_the_pytorch_path(kernels, name, setting):
    """Every kernel call of each block meets its kernel's preconditions, at odd widths, with masks and
    under autocast, and the outputs and gradients are those of the PyTorch path."""
    calls = kernels()
    make, expected_calls = BLOCKS[name]
    torch.manual_seed(0)
    block = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(with_backend(block, "cuda"), setting)
    assert not our_warnings(caught)
    assert calls.counts == expected_calls
    assert_same_run(got, run(with_backend(block, "torch"), setting))


@pytest.mark.parametrize("make,expected_calls", [
    (lambda: MambaBlock(64, d_state=16, d_conv=5), {SCAN: 1}),
    (lambda: Mamba2Block(64, d_state=16, headdim=16, d_conv=5, chunk_size=4), {SSD: 1, NORM: 1}),
], ids=["mamba", "mamba2"])
def test_blocks_with_d_conv_5(kernels, make, expected_calls):
    """Finding 3 end to end: the convolution runs in PyTorch under auto, once warned, the other
    kernels still run; under cuda the block fails with the width requirement."""
    calls = kernels()
    torch.manual_seed(0)
    block = make()
    with pytest.warns(RuntimeWarning, match="width \\(d_conv\\) is 5"):
        got = run(block, "float32 masked")
    assert calls.counts == expected_calls
    assert_same_run(got, run(with_backend(block, "torch"), "float32 masked"))
    with pytest.raises(RuntimeError, match="width \\(d_conv\\) is 5; the kernel supports 2 to 4"):
        run(with_backend(block, "cuda"), "float32")


def test_mamba_block_under_autocast_without_causal_conv1d(kernels):
    """Finding 4: with causal-conv1d missing, our convolution keeps the activations' dtype under
    autocast, so the selective scan gets u, delta, B, C and z in one dtype."""
    calls = kernels(absent=("causal_conv1d", "causal_conv1d_cuda"))
    torch.manual_seed(0)
    block = MambaBlock(64, d_state=16)
    with pytest.warns(RuntimeWarning, match="causal convolution runs in PyTorch on the GPU"):
        got = run(with_backend(block, "auto"), "autocast bfloat16 masked")
    assert calls.counts == {SCAN: 1}
    assert calls.args[SCAN][0][0].dtype == torch.bfloat16
    assert_same_run(got, run(with_backend(block, "torch"), "autocast bfloat16 masked"))


def test_mamba_block_large_state_and_float64(kernels):
    """Findings 7 and 8 end to end."""
    calls = kernels()
    torch.manual_seed(0)
    large = MambaBlock(16, d_state=300)
    with pytest.warns(RuntimeWarning, match="d_state is 300"):
        got = run(with_backend(large, "auto"), "float32")
    assert calls.counts == {CONV: 1}
    assert_same_run(got, run(with_backend(large, "torch"), "float32"))
    double = MambaBlock(16, d_state=4).double()
    with pytest.raises(RuntimeError, match="torch.float64"):
        run(with_backend(double, "cuda"), "float32")
    with pytest.warns(RuntimeWarning, match="torch.float64"):
        got = run(with_backend(double, "auto"), "float32")
    assert_same_run(got, run(with_backend(double, "torch"), "float32"))


MODEL_CALLS = {"Mamba4Rec": {CONV: 1, SCAN: 1}, "Mamba2Rec": {CONV: 1, SSD: 1, NORM: 1},
               "Hydra4Rec": {SSD: 1, NORM: 1}}  # one layer


@pytest.mark.parametrize("setting", ["float32", "autocast bfloat16"])
@pytest.mark.parametrize("model", MODELS)
def test_models_through_the_kernels_equal_the_pytorch_path(kernels, make_config, ml100k, model, setting):
    """The three RecBole models at hidden size 50 (d_inner 100, not a multiple of 8) and ngroups 2: the
    loss and its gradients through the kernels equal those of the PyTorch path."""
    calls = kernels()
    batch = next(iter(ml100k[1]))[torch.arange(64)]
    results = {}
    for backend in ("cuda", "torch"):
        torch.manual_seed(0)
        config = make_config(model, hidden_size=50, headdim=10, ngroups=2, ssm_backend=backend)
        net = get_model(model)(config, ml100k[1]._dataset).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in setting):
            loss = net.calculate_loss(batch)
        loss.backward()
        results[backend] = (loss, [p.grad for p in net.parameters()])
    assert calls.counts == MODEL_CALLS[model]
    assert_same_run(results["cuda"], results["torch"])
