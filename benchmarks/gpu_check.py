"""The GPU check: everything a lent GPU machine should run, in one command, within one time limit.

    python -m benchmarks.gpu_check --prepare .whl                 # here, with the package registry
    python -m benchmarks.gpu_check --out "$OUT"                   # there: all stages, 570 s
    python -m benchmarks.gpu_check --out "$OUT" --stages machine install build kernels efficiency quality

--prepare downloads what the GPU image lacks (WHEELS: RecBole and the three of its requirements
the image has not; SDISTS: mamba-ssm and causal-conv1d, built there) into a folder to carry.

Stages, in order (each is recorded as ok, failed or not run, with the reason and its seconds):
  machine     Python, torch, CUDA device, nvcc, Triton;
  install     recbole-ssm (editable, no dependencies) and the wheels in --wheelhouse (RecBole and the
              few requirements the GPU image lacks; benchmarks/README.md, "GPU check");
  build       mamba-ssm and causal-conv1d wheels from the sdists in --wheelhouse, for this GPU's
              architecture only, then installed; wheels already built in --build-dir (a machine still
              warm from the previous call) are reused;
  kernels     the four fused kernels load (recbole_ssm.ops.*.cuda.KERNEL.load()), in a fresh process
              (also without CUDA, to name what is missing);
  tests       python -m pytest tests/gpu, with a junit report whose measured errors go to the report;
  efficiency  python -m benchmarks.efficiency on the GPU, SASRec against our models, L up to 4096;
  quality     python -m benchmarks.quality on the GPU, ml-100k, one seed, a short training budget.

Everything goes to --out, flat, at most 8 files (the device tool's limits): gpu_check.md and
gpu_check.json (the report), gpu_check.log (every stage's output), efficiency.{json,md,png} and
quality-ml-100k.{json,md}. A stage that cannot run says why (no CUDA device, no nvcc, no wheelhouse,
a kernel that did not load); the report is written in every case, and the exit status is 1 when a
stage failed.
"""
import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from benchmarks.common import REPO_ROOT

STAGES = ("machine", "install", "build", "kernels", "tests", "efficiency", "quality")
EFFICIENCY_MODELS = ("SASRec", "Mamba4Rec", "Mamba2Rec", "Hydra4Rec")
EFFICIENCY_LENGTHS = (50, 200, 800, 2000, 4096)
# The kernels' packages: sdist name prefix -> the variable that makes setup.py build rather than
# download a prebuilt wheel (which would fail without network).
KERNEL_PACKAGES = {"mamba_ssm": "MAMBA_FORCE_BUILD", "causal_conv1d": "CAUSAL_CONV1D_FORCE_BUILD"}
# What the GPU image (Python 3.12, torch 2.11 + CUDA 13, no network; the device tool's KINDS.md) lacks.
# Pure-Python wheels, installed without dependencies: RecBole's own pins would replace the image's
# NumPy 2 and torch; recbole-ssm's compat module makes RecBole 1.2.1 run there (README, 'Python 3.12').
WHEELS = ("recbole==1.2.1", "colorlog==4.7.2", "texttable==1.7.0", "thop==0.1.1.post2209072238")
# The newest releases the [cuda] extra admits; both list CUDA 13's architectures in their setup.py.
SDISTS = ("mamba-ssm==2.3.2.post1", "causal-conv1d==1.7.0")
LOG_LIMIT = 8 * 2**20  # bytes of stage output kept in gpu_check.log
RESERVE_SECONDS = 20   # kept back from the deadline to write the report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--out", type=Path, help="run the check, writing into this folder (the device tool's $OUT)")
    task.add_argument("--prepare", type=Path, metavar="WHEELHOUSE",
                      help="download WHEELS and SDISTS into this folder (needs the package registry), then stop")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="stages to run, in their fixed order (default: all)")
    parser.add_argument("--wheelhouse", type=Path, default=REPO_ROOT / ".whl",
                        help="carried wheels and sdists (default: .whl in the repository)")
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / ".gpu_build",
                        help="where the kernels are built; kept between calls on a warm machine")
    parser.add_argument("--deadline", type=float, default=570,
                        help="seconds for the whole check (default: %(default)s, under the tool's 600)")
    parser.add_argument("--quality-epochs", type=int, default=20, help="(default: %(default)s)")
    return parser.parse_args(argv)


class Check:
    """The running report: stages, facts about the machine, the log, the deadline."""

    def __init__(self, out, deadline):
        self.out = out
        self.end = time.monotonic() + deadline
        self.report = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {},
                       "facts": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")

    def remaining(self):
        return self.end - time.monotonic() - RESERVE_SECONDS

    def log(self, text):
        print(text, flush=True)
        with self.log_path.open("a") as log:
            if self.log_path.stat().st_size < LOG_LIMIT:
                log.write(text + "\n")

    def record(self, stage, status, detail, seconds=None):
        self.report["stages"][stage] = {"status": status, "detail": detail,
                                        "seconds": None if seconds is None else round(seconds, 1)}
        self.log(f"== {stage}: {status}: {detail}")

    def status(self, stage):
        return self.report["stages"].get(stage, {}).get("status")

    def run(self, command, timeout, env=None, cwd=REPO_ROOT):
        """Run ``command``, its output into the log; (return code, or None after a timeout; output)."""
        self.log("$ " + " ".join(map(str, command)))
        timeout = max(1.0, timeout)
        try:
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        except subprocess.TimeoutExpired as expired:
            output = _text(expired.stdout) + _text(expired.stderr)
            self.log(output)
            return None, f"timed out after {timeout:.0f} s; last output: {_tail(output)}"
        output = done.stdout + done.stderr
        self.log(output)
        return done.returncode, output


def _text(data):
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _tail(output, lines=6):
    return " | ".join(line.strip() for line in output.strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- the stages

def stage_machine(check, args):
    facts = check.report["facts"]
    facts.update(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count())
    try:
        import torch
    except ImportError as error:
        return "failed", f"torch does not import: {error}"
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if facts["cuda_available"]:
        major, minor = torch.cuda.get_device_capability()
        facts.update(gpu=torch.cuda.get_device_name(), compute_capability=f"{major}{minor}",
                     gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if nvcc and os.path.exists(nvcc):
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        facts["nvcc"] = (re.findall(r"release ([\d.]+)", version) or ["?"])[0]
        facts["nvcc_path"] = nvcc
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    missing = [what for what, present in (("a CUDA device (torch.cuda.is_available() is False)",
                                           facts["cuda_available"]),
                                          ("nvcc (needed to build the kernels)", "nvcc" in facts),
                                          ("Triton (the SSD and RMSNorm kernels)", facts["triton"]))
               if not present]
    summary = ", ".join(f"{k} {facts.get(k)}" for k in ("gpu", "torch", "nvcc", "triton", "python"))
    return ("failed", f"missing: {'; '.join(missing)} ({summary})") if missing else ("ok", summary)


def stage_install(check, args):
    wheels = sorted(args.wheelhouse.glob("*.whl")) if args.wheelhouse.is_dir() else []
    code, output = check.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                              "--no-build-isolation", "-e", str(REPO_ROOT)], check.remaining())
    if code != 0:
        return "failed", f"pip install -e . failed: {_tail(output)}"
    if not wheels:
        return "failed", (f"recbole-ssm installed; no wheels in {args.wheelhouse}, so RecBole and its "
                          "missing requirements were not installed (benchmarks/README.md, 'GPU check')")
    code, output = check.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                              *map(str, wheels)], check.remaining())
    if code != 0:
        return "failed", f"pip install of {len(wheels)} wheels failed: {_tail(output)}"
    missing = _missing_imports(check, ("recbole", "colorlog", "texttable", "thop", "recbole_ssm"))
    if missing:
        return "failed", f"installed {len(wheels)} wheels, but these do not import: {missing}"
    return "ok", f"recbole-ssm (editable) and {', '.join(w.name for w in wheels)}"


def _missing_imports(check, modules):
    code = "import importlib, sys\n" + "".join(
        f"try: importlib.import_module({m!r})\nexcept Exception as e: print({m!r} + ': ' + repr(e))\n"
        for m in modules)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=max(1.0, check.remaining()))
    return "; ".join(done.stdout.split("\n")).strip("; ")


def stage_build(check, args):
    facts = check.report["facts"]
    carried = "; ".join(f"{package}: " + (", ".join(p.name for p in found) if (found := sorted(
        args.wheelhouse.glob(f"{package}-*"))) else f"nothing in {args.wheelhouse}") for package in KERNEL_PACKAGES)
    if not facts.get("cuda_available") or "nvcc" not in facts:
        return "not run", f"needs a CUDA device and nvcc (see the machine stage); carried: {carried}"
    wheels_dir = args.build_dir / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    built, todo = [], []
    for package, force_build in KERNEL_PACKAGES.items():
        ready = sorted(wheels_dir.glob(f"{package}-*.whl")) + sorted(args.wheelhouse.glob(f"{package}-*.whl"))
        sdists = sorted(args.wheelhouse.glob(f"{package}-*.tar.gz"))
        if ready:
            check.log(f"{package}: using {ready[-1]}")
            built.append(ready[-1])
        elif not sdists:
            return "failed", (f"no {package} sdist or wheel in {args.wheelhouse} (benchmarks/README.md, "
                              "'GPU check', says how to download it)")
        else:
            todo.append((package, force_build, sdists[-1]))
    nvcc = _one_architecture_nvcc(args.build_dir, facts["compute_capability"], facts["nvcc_path"])
    builds = []
    for package, force_build, sdist in todo:  # both at once: the small one finishes under the large one
        source = _unpack(sdist, args.build_dir)
        log_path = args.build_dir / f"{package}-build.log"
        env = {**os.environ, force_build: "TRUE", "PYTORCH_NVCC": str(nvcc), "MAX_JOBS": str(os.cpu_count() or 4)}
        command = [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation",
                   "-w", str(wheels_dir), str(source)]
        check.log(f"{package}: building {sdist.name} for sm_{facts['compute_capability']} (log {log_path})")
        with log_path.open("w") as log:
            process = subprocess.Popen(command, cwd=source, stdout=log, stderr=subprocess.STDOUT, env=env)
        builds.append((package, process, log_path, time.monotonic()))
    failures = []
    for package, process, log_path, start in builds:
        try:
            process.wait(timeout=max(1.0, check.remaining() - 30))
        except subprocess.TimeoutExpired:
            process.kill()
            failures.append(f"{package} did not finish building in {time.monotonic() - start:.0f} s")
            continue
        facts[f"{package}_build_seconds"] = round(time.monotonic() - start)
        output = log_path.read_text(errors="replace")
        check.log(f"{package}: build log ({len(output)} characters), last lines:\n"
                  + "\n".join(output.splitlines()[-40:]))
        wheels = sorted(wheels_dir.glob(f"{package}-*.whl"))
        if process.returncode != 0 or not wheels:
            failures.append(f"{package} build failed (exit {process.returncode}): {_tail(output, 4)}")
        else:
            built.append(wheels[-1])
    if built:
        code, output = check.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                  "--force-reinstall", *map(str, built)], check.remaining())
        if code != 0:
            failures.append(f"pip install of the built wheels failed: {_tail(output)}")
    facts["kernel_wheels_mib"] = {w.name: round(w.stat().st_size / 2**20, 1) for w in built}
    if failures:
        return "failed", "; ".join(failures)
    return "ok", "installed " + ", ".join(w.name for w in built)


def _unpack(sdist, build_dir):
    """The sdist's source folder under build_dir, unpacked afresh."""
    target = build_dir / sdist.name[:-len(".tar.gz")]
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(build_dir, filter="data")
    return target


def _one_architecture_nvcc(build_dir, arch, nvcc):
    """An executable that runs ``nvcc`` for ``arch`` alone (benchmarks/nvcc_one_arch.py)."""
    shim = build_dir / "nvcc"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO_ROOT / "benchmarks" / "nvcc_one_arch.py"}" '
                    f'{arch} "{nvcc}" "$@"\n')
    shim.chmod(0o755)
    return shim


def stage_kernels(check, args):
    program = ("import importlib\n"
            "for op in ('conv', 'selective_scan', 'ssd', 'gated_rmsnorm'):\n"
            "    kernel = importlib.import_module(f'recbole_ssm.ops.{op}.cuda').KERNEL\n"
            "    try:\n        kernel.load(); print('loaded', kernel.module + '.' + kernel.name)\n"
            "    except RuntimeError as error:\n        print('MISSING', error)\n"
            "for package in ('mamba_ssm', 'causal_conv1d'):\n"
            "    try: print('version', package, importlib.import_module(package).__version__)\n"
            "    except Exception as error: print('version', package, 'not importable:', repr(error))\n")
    code, output = check.run([sys.executable, "-c", program], check.remaining())
    missing = re.findall(r"^MISSING (.*)$", output, re.MULTILINE)
    check.report["facts"]["kernel_versions"] = dict(re.findall(r"^version (\S+) (.*)$", output, re.MULTILINE))
    if code != 0:
        return "failed", f"the kernel check did not run: {_tail(output)}"
    if missing:
        return "failed", f"{len(missing)} of 4 kernels missing: " + " | ".join(missing)
    if not check.report["facts"].get("cuda_available"):
        return "failed", "the kernels load, but there is no CUDA device to run them"
    return "ok", "causal_conv1d_fn, selective_scan_fn, mamba_chunk_scan_combined, rmsnorm_fn load"


def stage_tests(check, args):
    junit = args.build_dir / "gpu-tests.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    junit.unlink(missing_ok=True)
    code, output = check.run([sys.executable, "-m", "pytest", "tests/gpu", "-rA", "-p", "no:cacheprovider",
                              "-o", "junit_family=xunit1", f"--junitxml={junit}"], check.remaining())
    summary = _junit_summary(junit) if junit.exists() else None
    check.report["tests"] = summary
    if code is None:
        return "failed", output
    if summary is None:
        return "failed", f"pytest wrote no report (exit {code}): {_tail(output)}"
    counts = ", ".join(f"{summary[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
    if summary["skipped"] and not summary["passed"] and not summary["failed"]:
        return "not run", f"{counts}: {summary['skip_reasons'][0] if summary['skip_reasons'] else ''}"
    return ("ok" if code == 0 else "failed"), counts


def _junit_summary(path):
    """Counts, failures (test and first lines of the message) and recorded properties per test."""
    root = ElementTree.parse(path).getroot()
    summary = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": [],
               "measured": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        if properties:
            summary["measured"][name] = properties
        if outcome is None:
            summary["passed"] += 1
        elif outcome.tag == "skipped":
            summary["skipped"] += 1
            summary["skip_reasons"].append(_skip_reason(outcome))
        else:
            summary["failed" if outcome.tag == "failure" else "errors"] += 1
            summary["failures"].append({"test": name, "message": (outcome.get("message") or "")[:500]})
    return summary


def _skip_reason(skipped):
    """A junit <skipped> element's reason. A module skipped at collection has the message "collection
    skipped" and the text (path, line, "Skipped: reason")."""
    try:
        reason = ast.literal_eval((skipped.text or "").strip())[2]
    except (ValueError, SyntaxError, TypeError, IndexError):
        reason = skipped.get("message") or ""
    return reason.removeprefix("Skipped: ")


def efficiency_arguments(out, budget, backend):
    """The arguments of python -m benchmarks.efficiency in the efficiency stage."""
    return ["--device", "cuda", "--models", *EFFICIENCY_MODELS, "--lengths", *map(str, EFFICIENCY_LENGTHS),
            "--batch-size", "64", "--repeats", "10", "--warmup", "2", "--time-budget", f"{budget:.0f}",
            "--output-dir", str(out), "--set", f"ssm_backend={backend}"]


def quality_arguments(out, epochs, backend):
    """The arguments of python -m benchmarks.quality in the quality stage (ml-100k, its default)."""
    return ["--device", "cuda", "--models", *EFFICIENCY_MODELS, "--seeds", "2020", "--epochs", str(epochs),
            "--stopping-step", "5", "--output-dir", str(out), "--set", f"ssm_backend={backend}"]


def stage_efficiency(check, args):
    if not check.report["facts"].get("cuda_available"):
        return "not run", "no CUDA device"
    budget = max(60.0, check.remaining() * (0.5 if "quality" in args.stages else 1.0) - 15)
    backend = "cuda" if check.status("kernels") == "ok" else "torch"
    check.report["facts"]["benchmark_ssm_backend"] = backend
    command = [sys.executable, "-m", "benchmarks.efficiency", *efficiency_arguments(check.out, budget, backend)]
    code, output = check.run(command, budget + 15)
    note = "" if backend == "cuda" else " (our models on their PyTorch path: the kernels did not load)"
    if code is None:
        return "failed", output
    return ("ok" if code == 0 else "failed"), f"{_cells(check.out / 'efficiency.json')}{note}"


def _cells(path):
    if not path.exists():
        return "no efficiency.json"
    cells = json.loads(path.read_text())["cells"]
    return f"{sum(c['status'] == 'ok' for c in cells)} of {len(cells)} cells measured"


def stage_quality(check, args):
    if not check.report["facts"].get("cuda_available"):
        return "not run", "no CUDA device"
    backend = "cuda" if check.status("kernels") == "ok" else "torch"
    command = [sys.executable, "-m", "benchmarks.quality",
               *quality_arguments(check.out, args.quality_epochs, backend)]
    code, output = check.run(command, check.remaining())
    if code is None:
        return "failed", output + " (the runs that finished are in quality-ml-100k.json)"
    note = "" if backend == "cuda" else " (our models on their PyTorch path: the kernels did not load)"
    return ("ok" if code == 0 else "failed"), _tail(output, 3) + note


STAGE_FUNCTIONS = {"machine": stage_machine, "install": stage_install, "build": stage_build,
                   "kernels": stage_kernels, "tests": stage_tests, "efficiency": stage_efficiency,
                   "quality": stage_quality}


# ----------------------------------------------------------------------------- the report

def render_markdown(report):
    lines = ["# GPU check", "", f"Started {report['started_utc']}; arguments: `{' '.join(report['argv'])}`.", "",
             "| stage | status | seconds | detail |", "|---|---|---|---|"]
    for stage in STAGES:
        entry = report["stages"].get(stage, {"status": "not asked", "detail": "", "seconds": None})
        detail = entry["detail"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {stage} | {entry['status']} | {entry['seconds'] if entry['seconds'] is not None else ''} "
                     f"| {detail} |")
    lines += ["", "Facts: " + ", ".join(f"{k} = {v}" for k, v in report["facts"].items()), ""]
    tests = report.get("tests")
    if tests:
        lines += [f"tests/gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped.", ""]
        lines += [f"- FAILED {f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}"
                  for f in tests["failures"]]
        if tests["measured"]:
            lines += ["", "Measured errors (relative, against the bound):", ""]
            lines += [f"- {test}: " + "; ".join(f"{k}: {v}" for k, v in props.items())
                      for test, props in tests["measured"].items()]
    return "\n".join(lines) + "\n"


def prepare(wheelhouse):
    """Download WHEELS (for CPython 3.12 on Linux x86-64) and SDISTS into ``wheelhouse``."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheelhouse)]
    subprocess.run([*pip, "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
                    "--platform", "any", *WHEELS], check=True)
    # An sdist's metadata is prepared by its setup.py, told here not to compile anything.
    subprocess.run([*pip, "--no-binary=:all:", "--no-build-isolation", *SDISTS], check=True,
                   env={**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"})
    files = sorted(wheelhouse.iterdir())
    print(f"{wheelhouse}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB: "
          + ", ".join(f.name for f in files))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    args.out = args.out.resolve()
    check = Check(args.out, args.deadline)
    check.report["argv"] = sys.argv[1:] if argv is None else list(argv)
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if check.remaining() <= 0:
            check.record(stage, "not run", "the deadline was reached")
            continue
        start = time.monotonic()
        try:
            status, detail = STAGE_FUNCTIONS[stage](check, args)
        except Exception as error:  # a stage's own failure is reported, and the next stages still run
            status, detail = "failed", f"{type(error).__name__}: {error}"
        check.record(stage, status, detail, time.monotonic() - start)
    check.report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (args.out / "gpu_check.json").write_text(json.dumps(check.report, indent=2, default=str) + "\n")
    markdown = render_markdown(check.report)
    (args.out / "gpu_check.md").write_text(markdown)
    print(markdown)
    return 1 if any(entry["status"] == "failed" for entry in check.report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
