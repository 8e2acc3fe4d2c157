"""The device command (benchmarks/gpu_check.py) on a machine without CUDA: it runs to the end, writes
its report, and names what is missing instead of crashing; and the nvcc shim that builds the
kernels for one GPU architecture."""
import json

import torch

from benchmarks import gpu_check
from benchmarks.nvcc_one_arch import one_architecture


def test_without_cuda_the_check_reports_what_is_missing(tmp_path):
    assert not torch.cuda.is_available(), "this test describes a machine without CUDA"
    out, empty = tmp_path / "out", tmp_path / "wheelhouse"
    empty.mkdir()
    status = gpu_check.main(["--out", str(out), "--wheelhouse", str(empty), "--build-dir", str(tmp_path / "build"),
                             "--stages", "machine", "build", "kernels", "efficiency"])
    assert status == 1
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert list(stages) == ["machine", "build", "kernels", "efficiency"]
    assert stages["machine"]["status"] == "failed"
    assert "a CUDA device (torch.cuda.is_available() is False)" in stages["machine"]["detail"]
    assert stages["build"]["status"] == "not run"
    assert f"mamba_ssm: nothing in {empty}" in stages["build"]["detail"]
    assert stages["kernels"]["status"] == "failed"
    for kernel in ("causal_conv1d_fn", "selective_scan_fn", "mamba_chunk_scan_combined", "rmsnorm_fn"):
        assert kernel in stages["kernels"]["detail"]
    assert stages["efficiency"] == {"status": "not run", "detail": "no CUDA device", "seconds": 0.0}
    markdown = (out / "gpu_check.md").read_text()
    assert "| machine | failed |" in markdown and "| tests | not asked |" in markdown


def test_junit_report_of_a_skipped_gpu_suite_gives_the_reason(tmp_path):
    junit = tmp_path / "report.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="" name="tests.gpu.test_gpu_device">'
        '<skipped type="pytest.skip" message="collection skipped">'
        "('tests/gpu/test_gpu_device.py', 9, 'Skipped: tests/gpu needs a CUDA device')</skipped>"
        '</testcase><testcase classname="tests.gpu.test_gpu_ops" name="test_a">'
        '<properties><property name="output 0" value="1e-6 (bound 1e-5)"/></properties></testcase>'
        '<testcase classname="tests.gpu.test_gpu_ops" name="test_b"><failure message="relative error 2e-3">'
        'trace</failure></testcase></testsuite></testsuites>')
    summary = gpu_check._junit_summary(junit)
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (1, 1, 0, 1)
    assert summary["skip_reasons"] == ["tests/gpu needs a CUDA device"]
    assert summary["failures"] == [{"test": "tests.gpu.test_gpu_ops::test_b", "message": "relative error 2e-3"}]
    assert summary["measured"] == {"tests.gpu.test_gpu_ops::test_a": {"output 0": "1e-6 (bound 1e-5)"}}


def test_nvcc_shim_keeps_one_architecture():
    flags = ["-c", "scan.cu", "-gencode", "arch=compute_75,code=sm_75", "-gencode=arch=compute_90,code=sm_90",
             "-gencode", "arch=compute_121,code=sm_121", "-O3", "--use_fast_math"]
    assert one_architecture(flags, "90") == ["-c", "scan.cu", "-gencode=arch=compute_90,code=sm_90", "-O3",
                                             "--use_fast_math"]
    assert one_architecture(["-c", "scan.cu", "-gencode", "arch=compute_80,code=sm_80"], "90") == [
        "-c", "scan.cu", "-gencode", "arch=compute_90,code=sm_90"]
    # A target whose number only starts like ARCH's is another architecture.
    assert one_architecture(["-gencode", "arch=compute_100,code=sm_100"], "10") == [
        "-gencode", "arch=compute_10,code=sm_10"]


def test_benchmark_stages_pass_arguments_the_benchmarks_accept(tmp_path):
    """The efficiency and quality stages never ran here (no CUDA): their command lines at least parse,
    and ask for what the issue asks (SASRec against our models, L up to 4096, ml-100k, the kernels)."""
    from benchmarks import efficiency, quality

    bench = efficiency.parse_args(gpu_check.efficiency_arguments(tmp_path, 240, "cuda"))
    assert (bench.device, bench.time_budget, max(bench.lengths), bench.overrides) == ("cuda", 240, 4096, ["ssm_backend=cuda"])
    assert bench.models == ["SASRec", "Mamba4Rec", "Mamba2Rec", "Hydra4Rec"]
    run = quality.parse_args(gpu_check.quality_arguments(tmp_path, 20, "torch"))
    assert (run.device, run.dataset, run.epochs, run.seeds, run.overrides) == ("cuda", "ml-100k", 20, [2020],
                                                                        ["ssm_backend=torch"])
