"""Efficiency against sequence length: inference latency of ``full_sort_predict`` (a batch, and a
single user), training step time (forward + backward + Adam step) and peak memory, per model at
equal width and depth, on synthetic interactions over an ML-1M-sized item set (3,706 items).

    python -m benchmarks.efficiency                               # six models, L = 50 200 800 2000
    python -m benchmarks.efficiency --models SASRec Mamba4Rec --lengths 50 200 --batch-size 16
    python -m benchmarks.efficiency --device cuda --batch-size 256 --repeats 20

Every (model, L) cell runs in a fresh subprocess, so that on CPU its peak memory is the growth of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set
before the measured call; on CUDA it is the allocator's peak (torch.cuda.max_memory_allocated) over
the memory allocated before the call. Timings: warm-up calls, then the median and quartiles of
--repeats timed calls, CUDA synchronised. Lengths run in increasing order for all models; a cell that
would not fit the --time-budget (extrapolated from the model's shorter lengths), runs out of time or
memory is reported as "skipped (reason)", never dropped. Writes efficiency.json, efficiency.md and
efficiency.png (log-log, one line per model) into --output-dir.
"""
import argparse
import ctypes
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

N_ITEMS = 3706  # MovieLens-1M's item count
SYNTHETIC_DATASET = "synthetic-ml1m-items"
RESULT_PREFIX = "EFFICIENCY_RESULT "
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(common.DEFAULT_MODELS),
                        help="RecBole model names (default: %(default)s)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[50, 200, 800, 2000],
                        help="sequence lengths L = MAX_ITEM_LIST_LENGTH (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="users per batch for the batch latency and the training step "
                             "(default: %(default)s); the single-user latency uses 1")
    parser.add_argument("--hidden-size", type=int, default=common.DEFAULT_HIDDEN_SIZE,
                        help="width of every model (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=common.DEFAULT_LAYERS,
                        help="depth of every model (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds (batch, single user, train step) before memory and "
                             "timing (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per cell (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--time-budget", type=float, default=1800,
                        help="seconds for the whole run, 0 for none (default: %(default)s); cells "
                             "that would not fit are reported as skipped")
    parser.add_argument("--output-dir", type=Path, default=common.DEFAULT_OUTPUT_DIR,
                        help="where the JSON, Markdown and PNG go (default: benchmarks/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="RecBole config override for every model, value in YAML; repeatable")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="measure nothing: rewrite the Markdown and PNG of an earlier run's "
                             "JSON next to it")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print its result
    args = parser.parse_args(argv)
    args.lengths = sorted(set(args.lengths))
    if min(args.lengths) < 2 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("lengths must be >= 2, batch size and repeats >= 1, warmup >= 0")
    return args


# ----------------------------------------------------------------------------- one cell (subprocess)

def write_synthetic_dataset(root):
    """A RecBole atomic file in which each of N_ITEMS items occurs, so dataset.num(item) matches ML-1M."""
    folder = Path(root) / SYNTHETIC_DATASET
    folder.mkdir(parents=True, exist_ok=True)
    users = 64
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"u{i % users}\ti{i}\t{i}" for i in range(N_ITEMS)]
    (folder / f"{SYNTHETIC_DATASET}.inter").write_text("\n".join(lines) + "\n")
    return root


def cell_config(spec):
    """RecBole Config of one cell: the synthetic dataset with MAX_ITEM_LIST_LENGTH = L."""
    base = {
        "data_path": spec["data_root"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": spec["length"],
        "loss_type": "CE", "train_neg_sample_args": None,
        "seed": 2020, "reproducibility": False, "show_progress": False, "log_wandb": False,
    }
    return common.make_config(spec["model"], SYNTHETIC_DATASET, [], base, spec["hidden_size"],
                              spec["layers"], spec["device"], spec["overrides"])


def synthetic_batch(config, n_items, batch_size, length, device):
    """A RecBole Interaction of full-length histories: item_seq (B, L), item_seq_len = L, next items."""
    import torch
    from recbole.data.interaction import Interaction

    generator = torch.Generator().manual_seed(batch_size * 100003 + length)
    item_field = config["ITEM_ID_FIELD"]
    return Interaction({
        config["USER_ID_FIELD"]: torch.arange(1, batch_size + 1),
        item_field + config["LIST_SUFFIX"]: torch.randint(1, n_items, (batch_size, length),
                                                          generator=generator),
        config["ITEM_LIST_LENGTH_FIELD"]: torch.full((batch_size,), length),
        item_field: torch.randint(1, n_items, (batch_size,), generator=generator),
    }).to(device)


class PeakMemory:
    """Peak memory of the code in a ``with`` block, over what was in use when it started (bytes)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.bytes = None
        if self.device.type == "cuda":
            self.method = "CUDA allocator peak (max_memory_allocated) over allocated at start"
        elif _reset_peak_rss():
            self.method = "peak RSS growth: VmHWM (reset via /proc/self/clear_refs) minus VmRSS at start"
        else:
            self.method = "peak RSS growth: ru_maxrss minus VmRSS at start (lower bound if earlier peaks)"

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            _reset_peak_rss()
            self._start = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        self.bytes = max(0, peak - self._start)
        return False


def _proc_status_bytes(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _release_free_heap():
    """Give freed heap memory back to the OS (glibc), so that it does not hide the next peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_cell(spec):
    """A cell's RecBole config, dataset, batch transform and model (seeded), built in RecBole's order:
    the transform before the model, since BERT4Rec's sets the config keys that its model reads."""
    from recbole.data import create_dataset
    from recbole.data.transform import construct_transform
    from recbole.utils import init_seed

    config = cell_config(spec)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    transform = construct_transform(config)  # BERT4Rec: masks the training batch
    return config, dataset, transform, common.build_model(config, dataset)


def inference_of(model, interaction):
    """The timed inference call: ``full_sort_predict`` on ``interaction`` without gradients (the
    caller puts the model in evaluation mode)."""
    import torch

    def infer():
        with torch.no_grad():
            model.full_sort_predict(interaction)
    return infer


def train_step_of(model, interaction):
    """The timed training step on ``interaction`` (already transformed): loss, backward and a step of
    an Adam optimizer of its own (the caller puts the model in training mode)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model.calculate_loss(interaction).backward()
        optimizer.step()
    return train_step


def measure_cell(spec):
    """Build one model at one length and measure it; the dict that the parent records."""
    import torch

    start = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config, dataset, transform, model = build_cell(spec)
    device = config["device"]
    n_items = dataset.num(config["ITEM_ID_FIELD"])
    infer_batch = inference_of(model, synthetic_batch(config, n_items, spec["batch_size"], spec["length"], device))
    infer_single_user = inference_of(model, synthetic_batch(config, n_items, 1, spec["length"], device))
    train_step = train_step_of(model, transform(dataset, synthetic_batch(config, n_items, spec["batch_size"],
                                                                         spec["length"], device)))

    result = {"n_items": n_items, **common.count_parameters(model),
              "architecture": common.width_depth_of(config, spec["model"]),
              "torch_threads": torch.get_num_threads()}
    # Warm up every path (lazy initialisation, Adam's state), then measure memory, then time.
    for _ in range(spec["warmup"]):
        model.eval()
        infer_batch()
        infer_single_user()
        model.train()
        train_step()
    model.eval()
    with PeakMemory(device) as inference_memory:
        infer_batch()
    model.train()
    with PeakMemory(device) as train_memory:
        train_step()
    result["memory"] = {"inference_bytes": inference_memory.bytes, "train_bytes": train_memory.bytes,
                        "method": inference_memory.method}

    repeats = spec["repeats"]
    model.eval()
    result["inference_batch_ms"] = common.summarize_ms(
        common.time_repeated(infer_batch, repeats, 0, device))
    result["inference_single_ms"] = common.summarize_ms(
        common.time_repeated(infer_single_user, repeats, 0, device))
    model.train()
    result["train_step_ms"] = common.summarize_ms(
        common.time_repeated(train_step, repeats, 0, device))
    result["measure_seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- the run (parent)

def run_cell_subprocess(spec, timeout):
    """Run one cell in a fresh interpreter; (status, reason, result)."""
    command = [sys.executable, "-m", "benchmarks.efficiency", "--cell", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=common.REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "skipped", f"timed out after {timeout:.0f}s (time budget)", None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return "ok", None, json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
    text = "\n".join(tail)
    if done.returncode in (-9, 137) or "out of memory" in text.lower() or "MemoryError" in text:
        return "skipped", "out of memory", None
    return "failed", f"exit code {done.returncode}: {tail[-1] if tail else 'no output'}", {
        "stderr_tail": text}


def predicted_seconds(history, length):
    """Wall time of a model's next cell: its last cell's start-up time plus its measuring time
    extrapolated from the shorter lengths, with the growth exponent between its last two cells
    (clamped to [1, 2]), or quadratically from a single cell."""
    if not history:
        return None
    l1, measure1, wall1 = history[-1]
    exponent = 2.0
    if len(history) > 1:
        l0, measure0, _ = history[-2]
        exponent = min(2.0, max(1.0, math.log(measure1 / measure0) / math.log(l1 / l0)))
    return (wall1 - measure1) + measure1 * (length / l1) ** exponent


def run_all(args, overrides, data_root):
    """Every (length, model) cell, lengths outermost so that a budget cut hits the longest ones."""
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else math.inf
    cells, history, gave_up = [], {m: [] for m in args.models}, {}
    for length in args.lengths:
        for model in args.models:
            cell = {"model": model, "length": length}
            remaining = deadline - time.monotonic()
            predicted = predicted_seconds(history[model], length)
            if model in gave_up:
                cell.update(status="skipped", reason=f"{gave_up[model]} at a shorter length")
            elif remaining <= 0:
                cell.update(status="skipped", reason=f"time budget of {args.time_budget:.0f}s used up")
            elif predicted is not None and predicted > remaining:
                cell.update(status="skipped", reason=f"predicted {predicted:.0f}s > "
                                                     f"{remaining:.0f}s left of the time budget")
            else:
                spec = {"model": model, "length": length, "data_root": str(data_root),
                        "batch_size": args.batch_size, "hidden_size": args.hidden_size,
                        "layers": args.layers, "repeats": args.repeats, "warmup": args.warmup,
                        "device": args.device, "threads": args.threads, "overrides": overrides}
                start = time.monotonic()
                status, reason, result = run_cell_subprocess(
                    spec, None if math.isinf(remaining) else remaining)
                wall = time.monotonic() - start
                cell.update(status=status, wall_seconds=wall)
                if reason:
                    cell["reason"] = reason
                if result:
                    cell.update(result)
                if status == "ok":
                    history[model].append((length, result["measure_seconds"], wall))
                else:  # longer histories would fail or run out of time/memory the same way
                    gave_up[model] = reason.split(":")[0] if status == "failed" else reason
            cells.append(cell)
            common.progress(f"{model} L={length}: " + (
                f"batch {cell['inference_batch_ms']['median']:.1f} ms, single "
                f"{cell['inference_single_ms']['median']:.1f} ms, train step "
                f"{cell['train_step_ms']['median']:.1f} ms, peak memory "
                f"{cell['memory']['inference_bytes'] / MIB:.1f} / {cell['memory']['train_bytes'] / MIB:.1f}"
                f" MiB ({cell['wall_seconds']:.0f}s)" if cell["status"] == "ok"
                else f"{cell['status']} ({cell['reason']})"))
    return cells


def growth_exponent(cells, model, value):
    """Least-squares slope of log(value) against log(L) over a model's measured cells."""
    points = [(math.log(c["length"]), math.log(value(c))) for c in cells
              if c["model"] == model and c["status"] == "ok" and value(c) > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


METRICS = {  # what the table, the slopes and the plot show: title -> value of a measured cell
    "inference_batch": ("Inference, batch (ms)", lambda c: c["inference_batch_ms"]["median"]),
    "inference_single": ("Inference, 1 user (ms)", lambda c: c["inference_single_ms"]["median"]),
    "train_step": ("Train step (ms)", lambda c: c["train_step_ms"]["median"]),
    "inference_memory": ("Peak memory, inference (MiB)", lambda c: c["memory"]["inference_bytes"] / MIB),
    "train_memory": ("Peak memory, train step (MiB)", lambda c: c["memory"]["train_bytes"] / MIB),
}


def _ms_cell(summary):
    return f"{summary['median']:.1f} [{summary['q1']:.1f}–{summary['q3']:.1f}]"


def render_markdown(report):
    """Settings, machine, one row per (model, L), speed-ups against SASRec and growth exponents."""
    s = report["settings"]
    cells = report["cells"]
    headers = ["Model", "L", f"Inference, batch {s['batch_size']} (ms)", "Inference, 1 user (ms)",
               f"Train step, batch {s['batch_size']} (ms)", "Peak mem. inference (MiB)",
               "Peak mem. train (MiB)", "# Params", "# Params w/o emb."]
    rows = []
    for cell in sorted(cells, key=lambda c: (s["models"].index(c["model"]), c["length"])):
        if cell["status"] != "ok":
            rows.append([cell["model"], cell["length"], f"{cell['status']} ({cell['reason']})"]
                        + [""] * (len(headers) - 3))
            continue
        rows.append([cell["model"], cell["length"], _ms_cell(cell["inference_batch_ms"]),
                     _ms_cell(cell["inference_single_ms"]), _ms_cell(cell["train_step_ms"]),
                     f"{cell['memory']['inference_bytes'] / MIB:.1f}",
                     f"{cell['memory']['train_bytes'] / MIB:.1f}",
                     common.format_count(cell["params"]),
                     common.format_count(cell["params_without_embeddings"])])
    method = next((c["memory"]["method"] for c in cells if c["status"] == "ok"), "n/a")
    text = [
        "# Efficiency against sequence length", "",
        f"Machine: {common.machine_line(report['machine'])}.", "",
        f"Settings: hidden size {s['hidden_size']}, {s['layers']} layers for every model; "
        f"{report['n_items']} items; batch {s['batch_size']} of full-length synthetic histories; "
        f"{s['warmup']} warm-up round(s), then {s['repeats']} timed calls, median [quartiles]; "
        f"torch threads {s['threads'] or report['machine']['torch_threads']}; time budget "
        f"{s['time_budget'] or 'none'} s; overrides {s['overrides'] or 'none'}. Memory: {method}.",
        "", common.markdown_table(headers, rows),
    ]
    reference = common.REFERENCE_MODEL
    if reference in s["models"]:
        by_key = {(c["model"], c["length"]): c for c in cells if c["status"] == "ok"}
        speed_rows = []
        for model in s["models"]:
            if model == reference:
                continue
            row = [model]
            for length in s["lengths"]:
                ours, ref = by_key.get((model, length)), by_key.get((reference, length))
                row.append(" / ".join(
                    f"{METRICS[k][1](ref) / METRICS[k][1](ours):.2f}x" if ours and ref else "n/a"
                    for k in ("inference_batch", "inference_single", "train_step")))
            speed_rows.append(row)
        text += [f"Speed-up over {reference} (its time / the model's; > 1 is faster), as "
                 f"inference batch / inference 1 user / train step:", "",
                 common.markdown_table(["Model"] + [f"L={length}" for length in s["lengths"]],
                                       speed_rows)]
    slope_rows = [[model] + [f"{e:.2f}" if (e := growth_exponent(cells, model, METRICS[k][1]))
                             is not None else "n/a" for k in METRICS] for model in s["models"]]
    text += ["Growth exponent k in cost ∝ L^k (least-squares slope on log-log over the measured "
             "lengths; 1 = linear, 2 = quadratic; fixed costs such as scoring all items pull it "
             "below the asymptotic value):", "",
             common.markdown_table(["Model"] + [METRICS[k][0] for k in METRICS], slope_rows)]
    return "\n".join(text)


def plot(report, path):
    """Log-log PNG: latency (batch, single user), train step time and peak memory against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    panels = [("inference_batch", f"Inference latency, batch {s['batch_size']}"),
              ("inference_single", "Inference latency, 1 user"),
              ("train_step", f"Training step, batch {s['batch_size']}"),
              ("train_memory", "Peak memory (solid: train step, dashed: inference)")]
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    for axis, (key, title) in zip(axes.flat, panels):
        plotted = []
        for index, model in enumerate(s["models"]):
            color = f"C{index}"
            measured = [c for c in report["cells"] if c["model"] == model and c["status"] == "ok"]
            if not measured:
                continue
            lengths = [c["length"] for c in measured]
            values = [METRICS[key][1](c) for c in measured]
            axis.plot(lengths, values, "o-", color=color, label=model)
            plotted += values
            if key == "train_memory":
                inference = [METRICS["inference_memory"][1](c) for c in measured]
                axis.plot(lengths, inference, "s--", color=color, alpha=0.7)
                plotted += inference
        if plotted:  # slope guides from the models' geometric mean at the shortest length
            lengths = s["lengths"]
            first = [METRICS[key][1](c) for c in report["cells"]
                     if c["status"] == "ok" and c["length"] == lengths[0] and METRICS[key][1](c) > 0]
            anchor = math.exp(sum(map(math.log, first)) / len(first)) if first else min(plotted)
            for power, style in ((1, ":"), (2, "-.")):
                axis.plot(lengths, [anchor * (length / lengths[0]) ** power for length in lengths],
                          style, color="gray", alpha=0.6, label=f"∝ L^{power}")
            positive = [v for v in plotted if v > 0]
            if positive:
                axis.set_ylim(min(positive) / 1.5, max(positive) * 1.5)
        axis.set_ylabel("MiB" if "memory" in key else "ms")
        axis.set_title(title)
        common.log_log_lengths(axis, s["lengths"], "sequence length L", legend_fontsize=8)
    machine = report["machine"]
    figure.suptitle(f"{machine.get('gpu') or machine['cpu']} ({s['device']}), hidden "
                    f"{s['hidden_size']}, {s['layers']} layers, {report['n_items']} items", fontsize=11)
    return common.save_figure(figure, path)


def main(argv=None):
    args = parse_args(argv)
    if args.cell:
        result = measure_cell(json.loads(args.cell))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.from_json:
        common.rewrite_reports(args.from_json, render_markdown, plot)
        return 0
    common.check_models_registered(args.models)
    overrides = common.parse_overrides(args.overrides)
    common.device_overrides(args.device)
    report = {
        "benchmark": "efficiency",
        "settings": {"models": args.models, "lengths": args.lengths, "batch_size": args.batch_size,
                     "hidden_size": args.hidden_size, "layers": args.layers,
                     "repeats": args.repeats, "warmup": args.warmup, "device": args.device,
                     "threads": args.threads,
                     "time_budget": args.time_budget, "overrides": overrides},
        "machine": common.machine_info(args.device),
    }
    with tempfile.TemporaryDirectory(prefix="recbole-ssm-efficiency-") as data_root:
        write_synthetic_dataset(data_root)
        report["cells"] = run_all(args, overrides, data_root)
    # RecBole counts the padding item 0 too
    report["n_items"] = next((c["n_items"] for c in report["cells"] if c["status"] == "ok"), None)
    common.save_reports(report, args.output_dir / "efficiency", render_markdown, plot)
    return 1 if any(c["status"] == "failed" for c in report["cells"]) else 0


if __name__ == "__main__":
    common.import_recbole_ssm()
    sys.exit(main())
