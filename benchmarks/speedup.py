"""Speed-ups over SASRec measured side by side: at each shape, every model is built in one process and
their timed calls alternate round by round, so that a shared machine's drifting load hits all models
alike (the efficiency benchmark runs each model in a process of its own, one after the other). Each
shape gets a fresh process: what one shape leaves in the memory allocator changes the next one's
times (SASRec's training step at 256x200 took a third less time after the 2048x50 shape had run in
the same process, the SSM models' a tenth less), and a training run meets one shape from its start.

    python -m benchmarks.speedup                                   # the targets' shapes, 1 and 2 threads
    python -m benchmarks.speedup --shapes train:2048x50 infer:8x200 --threads 1 --rounds 5 --min-seconds 0

A shape is ``train:BxL`` (a training step: forward, backward and Adam step on a batch of B users with
histories of L items) or ``infer:BxL`` (``full_sort_predict`` of B users). Each call is timed twice:
wall-clock and the process's CPU time. With one thread, CPU time is the steadier measure of the work
done (another job taking a core delays but does not add to it); with two threads, wall-clock is what a
user waits and CPU time shows how much the second thread added. Same synthetic data and settings as
``benchmarks.efficiency`` (3,706 items, hidden 64, 2 layers, each model's other defaults). Writes
speedup.json and speedup.md into --output-dir.
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, efficiency

DEFAULT_SHAPES = ["train:2048x50", "train:256x200", "train:16x2000",
                  "infer:8x200", "infer:1x200", "infer:8x2000", "infer:1x2000"]


def parse_shape(text):
    try:
        kind, size = text.split(":")
        batch, length = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected train:BxL or infer:BxL, e.g. train:2048x50")
    if kind not in ("train", "infer") or batch < 1 or length < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: kind train or infer, B >= 1, L >= 2")
    return kind, batch, length


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speedup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[common.REFERENCE_MODEL, *common.SSM_MODELS],
                        help="RecBole model names, the first is the reference (default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="KIND:BxL", help=f"default: {' '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="torch threads, each a run of every shape (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="at least this many timed calls per model and shape, alternating models "
                             "(default: %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="after --rounds, more rounds until the shape's timed calls (all models) "
                             "add up to this many seconds of wall-clock, so that small calls get "
                             "hundreds of samples (default: %(default)s; 0: exactly --rounds)")
    parser.add_argument("--max-rounds", type=int, default=500,
                        help="at most this many rounds per shape (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=common.DEFAULT_HIDDEN_SIZE)
    parser.add_argument("--layers", type=int, default=common.DEFAULT_LAYERS)
    parser.add_argument("--output-dir", type=Path, default=common.DEFAULT_OUTPUT_DIR,
                        help="where the JSON and Markdown go (default: benchmarks/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="RecBole config override for every model, value in YAML; repeatable")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.threads) < 1:
        parser.error("rounds and threads must be >= 1")
    if args.min_seconds < 0 or args.max_rounds < args.rounds:
        parser.error(f"--min-seconds must be >= 0 and --max-rounds >= --rounds ({args.rounds}); got "
                     f"{args.min_seconds} and {args.max_rounds}")
    return args


def build_call(model_name, kind, batch_size, length, args, overrides, data_root):
    """The model at this shape, built as the efficiency benchmark builds it, and its timed call of
    ``kind`` on a synthetic batch."""
    spec = {"model": model_name, "length": length, "data_root": data_root, "hidden_size": args.hidden_size,
            "layers": args.layers, "device": "cpu", "overrides": overrides}
    config, dataset, transform, model = efficiency.build_cell(spec)
    interaction = efficiency.synthetic_batch(config, dataset.num(config["ITEM_ID_FIELD"]), batch_size, length, "cpu")
    if kind == "infer":
        model.eval()
        return efficiency.inference_of(model, interaction)
    model.train()
    return efficiency.train_step_of(model, transform(dataset, interaction))


def measure_shape(kind, batch_size, length, threads, args, overrides, data_root):
    """Per model: first-call seconds, then alternating timed calls (wall and CPU seconds): ``rounds``
    rounds, then more until the timed calls add up to ``min_seconds`` or ``max_rounds`` is reached
    (five rounds of a one-user call at L = 200, about 1.5 ms each, gave ratios 15% apart between two
    runs minutes apart)."""
    import torch

    torch.set_num_threads(threads)
    calls, first_call = {}, {}
    for model_name in args.models:
        calls[model_name] = build_call(model_name, kind, batch_size, length, args, overrides, data_root)
        start = time.perf_counter()
        calls[model_name]()          # lazy initialisation, Adam's state, compiled kernels loaded
        first_call[model_name] = time.perf_counter() - start
    wall = {m: [] for m in args.models}
    cpu = {m: [] for m in args.models}
    timed = 0.0
    for done in range(args.max_rounds):
        if done >= args.rounds and timed >= args.min_seconds:
            break
        for model_name, call in calls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            call()
            cpu[model_name].append(time.process_time() - start_cpu)
            wall[model_name].append(time.perf_counter() - start_wall)
            timed += wall[model_name][-1]
    return {m: {"wall_ms": common.summarize_ms(wall[m]), "cpu_ms": common.summarize_ms(cpu[m]),
                "first_call_ms": first_call[m] * 1e3} for m in args.models}


def _measure_shape_imported(*measure_args):
    common.import_recbole_ssm()
    return os.getpid(), measure_shape(*measure_args)


def measure_shape_in_fresh_process(*measure_args):
    """:func:`measure_shape` in a spawned interpreter of its own; (its process id, the result)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_shape_imported, measure_args)


def render_markdown(report):
    s = report["settings"]
    reference, others = s["models"][0], s["models"][1:]
    lines = ["# Speed-ups over " + reference + ", side by side", "",
             f"Machine: {common.machine_line(report['machine'])}.", "",
             f"Hidden size {s['hidden_size']}, {s['layers']} layers; alternating timed calls per model and "
             f"shape, at least {s['rounds']} rounds and more until they add up to {s['min_seconds']:g} s "
             f"(at most {s['max_rounds']} rounds; the rounds column), medians; overrides "
             f"{s['overrides'] or 'none'}. Speed-up = {reference}'s median time / the model's (> 1: faster), "
             "from CPU time and from wall-clock time.", ""]
    headers = ["threads", "shape", "rounds", f"{reference} CPU ms", f"{reference} wall ms"]
    headers += [f"{m} (CPU / wall)" for m in others]
    rows = []
    for run in report["runs"]:
        ref = run["models"][reference]
        row = [run["threads"], f"{run['kind']} {run['batch_size']}x{run['length']}", ref["wall_ms"]["n"],
               f"{ref['cpu_ms']['median']:.1f}", f"{ref['wall_ms']['median']:.1f}"]
        for m in others:
            ours = run["models"][m]
            row.append(f"{ref['cpu_ms']['median'] / ours['cpu_ms']['median']:.2f}x / "
                       f"{ref['wall_ms']['median'] / ours['wall_ms']['median']:.2f}x")
        rows.append(row)
    lines.append(common.markdown_table(headers, rows))
    lines += ["", "First call (ms; the first training step also creates Adam's state; Numba kernels are "
              "loaded from the disk cache or compiled, see benchmarks.kernels for their compile times):", ""]
    first_rows = [[run["threads"], f"{run['kind']} {run['batch_size']}x{run['length']}"]
                  + [f"{run['models'][m]['first_call_ms']:.0f}" for m in s["models"]] for run in report["runs"]]
    lines.append(common.markdown_table(["threads", "shape"] + s["models"], first_rows))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    common.check_models_registered(args.models)
    overrides = common.parse_overrides(args.overrides)
    report = {"benchmark": "speedup",
              "settings": {"models": args.models, "threads": args.threads, "rounds": args.rounds,
                           "min_seconds": args.min_seconds, "max_rounds": args.max_rounds,
                           "hidden_size": args.hidden_size, "layers": args.layers, "overrides": overrides,
                           "shapes": [f"{k}:{b}x{l}" for k, b, l in args.shapes]},
              "machine": common.machine_info("cpu"), "runs": []}
    with tempfile.TemporaryDirectory(prefix="recbole-ssm-speedup-") as data_root:
        efficiency.write_synthetic_dataset(data_root)
        for threads in args.threads:
            for kind, batch_size, length in args.shapes:
                process_id, models = measure_shape_in_fresh_process(kind, batch_size, length, threads, args,
                                                                    overrides, data_root)
                report["runs"].append({"threads": threads, "kind": kind, "batch_size": batch_size,
                                       "length": length, "process_id": process_id, "models": models})
                ref = models[args.models[0]]["cpu_ms"]["median"]
                common.progress(f"{threads} thread(s), {kind} {batch_size}x{length}: " + ", ".join(
                    f"{m} {v['cpu_ms']['median']:.0f} ms CPU ({ref / v['cpu_ms']['median']:.2f}x)"
                    for m, v in models.items()))
    common.save_reports(report, args.output_dir / "speedup", render_markdown)
    return 0


if __name__ == "__main__":
    common.import_recbole_ssm()
    sys.exit(main())
