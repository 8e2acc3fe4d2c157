"""What the quality and efficiency benchmarks share: the model list and how width and depth map onto
each model's own config keys, RecBole configs and models, parameter counts, timing, a description of
the machine, and the JSON / Markdown writers.

Every entry point calls :func:`import_recbole_ssm` before touching RecBole: it registers our models
and applies the compatibility fixes (NumPy, PyTorch checkpoint loading) that RecBole 1.2.1 needs.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
DEFAULT_OUTPUT_DIR = BENCHMARKS_DIR / "results"

RECBOLE_MODELS = ("SASRec", "GRU4Rec", "BERT4Rec")
SSM_MODELS = ("Mamba4Rec", "Mamba2Rec", "Hydra4Rec")
DEFAULT_MODELS = RECBOLE_MODELS + SSM_MODELS
REFERENCE_MODEL = "SASRec"  # the baseline that speed-ups and quality gaps are measured against

DEFAULT_HIDDEN_SIZE = 64
DEFAULT_LAYERS = 2

# How one width (hidden size) and one depth (number of layers) map onto each model's config keys.
# "width" keys get the hidden size, "ffn" keys four times it (the feed-forward inner size that our
# SSM layers use, and RecBole's SASRec/BERT4Rec default of 256 at width 64), "depth" keys the layers.
# GRU4Rec: its item embedding and its GRU state both get the width, and the depth is stacked GRUs.
# Models not listed (ours) use recbole_ssm's keys: hidden_size, num_layers (FFN fixed at 4x width).
ARCHITECTURE_KEYS = {
    "SASRec": {"width": ("hidden_size",), "ffn": ("inner_size",), "depth": ("n_layers",)},
    "BERT4Rec": {"width": ("hidden_size",), "ffn": ("inner_size",), "depth": ("n_layers",)},
    "GRU4Rec": {"width": ("embedding_size", "hidden_size"), "ffn": (), "depth": ("num_layers",)},
}
SSM_ARCHITECTURE_KEYS = {"width": ("hidden_size",), "ffn": (), "depth": ("num_layers",)}


def progress(message):
    """One progress line on stderr (stdout stays free for results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def import_recbole_ssm():
    """Import recbole_ssm (registers our models, applies RecBole compatibility fixes) or exit clearly."""
    try:
        import recbole_ssm
    except ImportError as error:
        raise SystemExit(
            f"benchmarks need the recbole_ssm package, which could not be imported ({error}). "
            "Install it from the repository root with `pip install -e .[bench]`."
        ) from error
    return recbole_ssm


def check_models_registered(models):
    """Exit with a clear message if any requested model is unknown to RecBole: never skip one."""
    recbole_ssm = import_recbole_ssm()
    from recbole_ssm.cli import check_model

    missing = []
    for name in models:
        try:
            check_model(name)
        except ValueError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"not registered with RecBole: {', '.join(missing)}. recbole_ssm "
            f"{recbole_ssm.__version__} registers {', '.join(recbole_ssm.registry.model_names())}; "
            "RecBole's own models need no registration. Ask for other --models, or update recbole_ssm."
        )


def architecture_overrides(model, hidden_size, layers):
    """Config entries that give ``model`` width ``hidden_size`` and ``layers`` layers."""
    keys = ARCHITECTURE_KEYS.get(model, SSM_ARCHITECTURE_KEYS)
    overrides = {key: hidden_size for key in keys["width"]}
    overrides.update({key: 4 * hidden_size for key in keys["ffn"]})
    overrides.update({key: layers for key in keys["depth"]})
    return overrides


def device_overrides(device):
    """RecBole's use_gpu / gpu_id for ``cpu``, ``cuda`` or ``cuda:N``; exits if CUDA is missing."""
    if device == "cpu":
        return {"use_gpu": False, "gpu_id": ""}
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available on this machine")
        return {"use_gpu": True, "gpu_id": device.partition(":")[2] or "0"}
    raise SystemExit(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def parse_overrides(assignments):
    """``["key=value", ...]`` from ``--set`` -> dict, each value read as YAML (numbers, lists, ~)."""
    overrides = {}
    for assignment in assignments or ():
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects key=value, got {assignment!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def make_config(model, dataset, config_files, base, hidden_size, layers, device, overrides):
    """A RecBole Config: the YAML files, then ``base``, the equalised width/depth, the device and
    last the user's ``--set`` overrides (later entries win; all of them win over the YAML files)."""
    from recbole.config import Config

    config_dict = dict(base)
    config_dict.update(architecture_overrides(model, hidden_size, layers))
    config_dict.update(device_overrides(device))
    config_dict.update(overrides)
    return Config(model=model, dataset=dataset,
                  config_file_list=[str(path) for path in config_files] or None,
                  config_dict=config_dict)


def build_model(config, dataset):
    """The model named in ``config``, built the way RecBole does it, on ``config['device']``."""
    from recbole.utils import get_model

    return get_model(config["model"])(config, dataset).to(config["device"])


def count_parameters(model):
    """Trainable parameters in all, and without embedding tables (items, positions)."""
    import torch.nn as nn

    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embeddings = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, nn.Embedding) and m.weight.requires_grad)
    return {"params": total, "params_without_embeddings": total - embeddings}


def width_depth_of(config, model):
    """The config values that the width/depth mapping set, for the record."""
    keys = ARCHITECTURE_KEYS.get(model, SSM_ARCHITECTURE_KEYS)
    return {key: config[key] for group in keys.values() for key in group}


def synchronize(device):
    """Wait for queued CUDA work so that wall-clock timing covers it (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_repeated(fn, repeats, warmup, device):
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds per timed call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def summarize_ms(seconds):
    """Median, quartiles, min, max and mean of timings given in seconds, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q1, q3 = (statistics.quantiles(ms, n=4, method="inclusive")[::2] if len(ms) > 1
              else (ms[0], ms[0]))
    return {"n": len(ms), "median": statistics.median(ms), "q1": q1, "q3": q3,
            "min": ms[0], "max": ms[-1], "mean": statistics.fmean(ms)}


def mean_std(values):
    """Mean and sample standard deviation (None for a single value)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision():
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        return revision + ("-dirty" if dirty.strip() else "") if revision else None
    except (OSError, subprocess.SubprocessError):
        return None


OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_PROC_BIND")


def machine_info(device):
    """Where and with what a benchmark ran: CPU/GPU, threads, load, library versions, git revision."""
    import recbole
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_5m_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recbole": getattr(recbole, "__version__", None),
        "recbole_ssm": getattr(import_recbole_ssm(), "__version__", None),
        "git_revision": _git_revision(),
        "device": device,
        # Threading settings read by torch's OpenMP runtime at start (with more than one thread,
        # OMP_WAIT_POLICY=PASSIVE changes the SSM models' times: README, "Kernels and backends").
        "openmp_environment": {name: os.environ[name] for name in OPENMP_VARIABLES if name in os.environ},
    }
    try:
        with open("/proc/meminfo") as meminfo:
            info["memory_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info):
    """One human line describing the machine, for Markdown reports."""
    where = info.get("gpu") or f"{info['cpu']} ({info['cpus_usable']} usable cores, " \
                               f"{info['memory_gib']} GiB)"
    load = info.get("load_average_1m_5m_15m")
    load_text = f", load average at start {load[0]:.1f}" if load else ""
    openmp = info.get("openmp_environment")
    openmp_text = "; " + " ".join(f"{k}={v}" for k, v in openmp.items()) if openmp else ""
    return (f"{where}; {info['device']}; torch {info['torch']}, RecBole {info['recbole']}, "
            f"recbole_ssm {info['recbole_ssm']} (git {info['git_revision']}){load_text}{openmp_text}; "
            f"{info['date_utc']}")


def display_path(path):
    """A path relative to the repository root when it lies inside it, for reports."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_json(path, payload):
    """Write ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_text(path, text):
    """Write a text file, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_reports(report, stem, render_markdown, plot=None):
    """``<stem>.md`` (``render_markdown(report)``, also printed) and, given ``plot``, ``<stem>.png``
    (``plot(report, path)``)."""
    markdown = render_markdown(report)
    write_text(Path(stem).with_suffix(".md"), markdown)
    if plot is None:
        progress(f"wrote {stem}.md")
    else:
        try:
            plot(report, Path(stem).with_suffix(".png"))
            progress(f"wrote {stem}.md and {stem}.png")
        except ImportError as error:  # matplotlib is in the [bench] extra, not a requirement
            progress(f"wrote {stem}.md; NOT {stem}.png: {error} (pip install -e .[bench])")
    print(markdown)


def save_reports(report, stem, render_markdown, plot=None):
    """A finished run: ``<stem>.json`` (the report itself), then :func:`write_reports`."""
    write_json(Path(stem).with_suffix(".json"), report)
    write_reports(report, stem, render_markdown, plot)


def rewrite_reports(json_path, render_markdown, plot):
    """--from-json: the Markdown and PNG of an earlier run's JSON, written next to it."""
    write_reports(json.loads(Path(json_path).read_text()), Path(json_path).with_suffix(""), render_markdown, plot)


def save_figure(figure, path):
    """Lay out, write as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_log_lengths(axis, lengths, xlabel, legend_fontsize):
    """Log-log axes over sequence lengths (ticks at the lengths measured), a grid and a legend."""
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.minorticks_off()
    axis.set_xlabel(xlabel)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=legend_fontsize)


def markdown_table(headers, rows):
    """A GitHub Markdown table; ``rows`` are sequences of already formatted cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_count(count):
    """12345 -> '12,345'."""
    return f"{count:,}" if count is not None else "n/a"


def format_mean_std(mean, std, digits=4):
    """'0.1234 ± 0.0012', or just the mean when there is no spread (one seed)."""
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"
