"""Streaming against recomputing: the latency of serving one new interaction per user with a step of
the user's state (``step`` + ``all_item_scores``: the scores of ``full_sort_predict``), against
``full_sort_predict`` on the whole history by the same model and by SASRec; events per second; state
memory per user against SASRec's cached keys and values. Synthetic histories over an ML-1M-sized item
set (3,706 items), every measurement with 1 torch thread and with 2, side by side in one run.

    python -m benchmarks.streaming                          # Mamba4Rec, Mamba2Rec, SASRec; L = 50 200 2000
    python -m benchmarks.streaming --lengths 50 200 --batch-sizes 1 256 --threads 1
    python -m benchmarks.streaming --from-json benchmarks/results/streaming.json   # re-render only

Per (history length L, batch B, threads): for each streaming model, states after histories of L - 1
items (``state_from_history``), then the timed step that appends the L-th item to each of the B users
and scores all items; the same model's and SASRec's ``full_sort_predict`` on the B histories of L
items. Recomputing a large batch of long histories takes minutes, so it is timed on at most
--recompute-users of the B users (in chunks of --recompute-chunk, for memory) and scaled to B: it is
linear in the users. For each (L, B) and thread count, all the measurements run side by side: one
warm-up call each, then --min-repeats rounds in which each runs for about --seconds / --min-repeats
(at least once); medians and quartiles of wall-clock and CPU time. Writes streaming.json,
streaming.md and streaming.png into --output-dir.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.efficiency import cell_config, write_synthetic_dataset

STREAMING_MODELS = ("Mamba4Rec", "Mamba2Rec")
TARGETS = {  # (what, value) the issue asks for
    "speedup_vs_reference_at_200": 20,
    "speedup_vs_reference_at_2000": 100,
    "events_per_second_at_1024": 50_000,
}
FLOAT_BYTES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(STREAMING_MODELS),
                        help="streaming models (default: %(default)s)")
    parser.add_argument("--reference", default=common.REFERENCE_MODEL,
                        help="the recomputing baseline (default: %(default)s)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[50, 200, 2000],
                        help="history lengths L, the new item included (default: %(default)s)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 1024],
                        help="users per call (default: %(default)s)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="torch CPU thread counts, measured side by side (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=common.DEFAULT_HIDDEN_SIZE,
                        help="width of every model (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=1, help="depth of every model (default: %(default)s)")
    parser.add_argument("--recompute-users", type=int, default=128,
                        help="users on which a batch's recomputation is timed (default: %(default)s)")
    parser.add_argument("--recompute-chunk", type=int, default=16,
                        help="users per full_sort_predict call when recomputing (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time each measurement for about this long (default: %(default)s)")
    parser.add_argument("--min-repeats", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("--max-repeats", type=int, default=200, help="(default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=common.DEFAULT_OUTPUT_DIR,
                        help="where the JSON, Markdown and PNG go (default: benchmarks/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="RecBole config override for every model, value in YAML; repeatable")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="measure nothing: rewrite the Markdown and PNG of an earlier run's JSON")
    args = parser.parse_args(argv)
    args.lengths = sorted(set(args.lengths))
    if (min(args.lengths) < 2 or min(args.batch_sizes) < 1 or min(args.threads) < 1
            or args.recompute_users < 1 or args.recompute_chunk < 1 or args.min_repeats < 1):
        parser.error("lengths must be >= 2; batch sizes, threads, recompute users and chunk, repeats >= 1")
    return args


# ----------------------------------------------------------------------------------- measuring

def timed_side_by_side(functions, args):
    """Wall-clock and CPU seconds per call of each of ``functions`` ({key: {"wall": [...], "cpu": [...]}}),
    measured side by side, so that other jobs' load falls on all of them alike: one warm-up call each,
    then ``args.min_repeats`` rounds in which each function runs for about ``args.seconds /
    args.min_repeats`` (at least once). CPU time (the process's, all threads) moves less with other jobs
    on a shared machine; with several threads it also counts their waiting."""
    for fn in functions.values():
        fn()
    samples = {key: {"wall": [], "cpu": []} for key in functions}
    per_round = max(1, args.max_repeats // args.min_repeats)
    for _ in range(args.min_repeats):
        for key, fn in functions.items():
            deadline = time.perf_counter() + args.seconds / args.min_repeats
            for _ in range(per_round):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                samples[key]["wall"].append(time.perf_counter() - start)
                samples[key]["cpu"].append(time.process_time() - start_cpu)
                if time.perf_counter() >= deadline:
                    break
    return samples


def record(cell, key, samples):
    """A measurement's wall-clock and CPU summaries in milliseconds, as ``<key>_ms`` and ``<key>_cpu_ms``."""
    cell[f"{key}_ms"] = common.summarize_ms(samples["wall"])
    cell[f"{key}_cpu_ms"] = common.summarize_ms(samples["cpu"])


def build_models(args, overrides, data_root):
    """{name: (model in eval mode, its dataset, its config)} for the streaming models and the reference."""
    import torch
    from recbole.data import create_dataset

    models = {}
    for name in [*args.models, args.reference]:
        config = cell_config({"model": name, "length": max(args.lengths), "data_root": str(data_root),
                              "hidden_size": args.hidden_size, "layers": args.layers, "device": "cpu",
                              "overrides": overrides})
        torch.manual_seed(0)
        dataset = create_dataset(config)
        models[name] = (common.build_model(config, dataset).eval(), dataset, config)
    return models


def histories(model, batch, length):
    """``batch`` random histories of ``length`` items and one next item each."""
    import torch

    generator = torch.Generator().manual_seed(batch * 7919 + length)
    return (torch.randint(1, model.n_items, (batch, length), generator=generator),
            torch.randint(1, model.n_items, (batch,), generator=generator))


def recompute_function(model, batch, length, args):
    """``full_sort_predict`` on at most ``args.recompute_users`` of ``batch`` histories of ``length`` items,
    in chunks of ``args.recompute_chunk`` users, and that number of users."""
    import torch

    users = min(batch, args.recompute_users)
    item_seq, _ = histories(model, users, length)
    chunks = [{model.ITEM_SEQ: item_seq[start:start + args.recompute_chunk],
               model.ITEM_SEQ_LEN: torch.full((len(item_seq[start:start + args.recompute_chunk]),), length)}
              for start in range(0, users, args.recompute_chunk)]

    def recompute():
        with torch.no_grad():
            for chunk in chunks:
                model.full_sort_predict(chunk)

    return recompute, users


def streaming_functions(model, dataset, batch, length, args):
    """A step of ``batch`` users after histories of ``length - 1`` items: with the scores of all items,
    without them, and through a :class:`~recbole_ssm.serving.StateStore`'s ``observe``."""
    import torch

    from recbole_ssm.serving import StateStore

    users = min(batch, args.recompute_users)
    item_seq, _ = histories(model, users, length - 1)
    sampled = model.state_from_history(item_seq, torch.full((users,), length - 1))
    repeat = torch.arange(batch) % users  # the sampled users' states, repeated to the batch
    state = {name: tensor.index_select(0, repeat) for name, tensor in sampled.items()}
    _, items = histories(model, batch, length)
    store = StateStore.for_dataset(model, dataset, capacity=batch)
    user_tokens = [f"user-{row}" for row in range(batch)]
    item_tokens = [store.item_tokens[item] for item in items.tolist()]
    store.observe(user_tokens, item_tokens)

    def step_and_score():
        representation, _ = model.step(state, items)
        model.all_item_scores(representation)

    return {"step_and_scores": step_and_score, "step": lambda: model.step(state, items),
            "store_observe": lambda: store.observe(user_tokens, item_tokens)}


def state_bytes_per_user(model):
    return sum(tensor[0].numel() * tensor.element_size() for tensor in model.empty_state(1).values())


def kv_cache_bytes_per_user(config, length):
    """Keys and values a KV-cached Transformer keeps for a history: 2 x layers x L x hidden floats."""
    return 2 * config["n_layers"] * length * config["hidden_size"] * FLOAT_BYTES


def run_all(args, models):
    """Every (L, batch) group: all models' measurements side by side, with each thread count in turn."""
    import torch

    cells = []
    for length in args.lengths:
        for batch in args.batch_sizes:
            functions, timed_users = {}, {}
            for name in [*args.models, args.reference]:
                model, dataset, _ = models[name]
                functions[(name, "recompute")], timed_users[name] = recompute_function(model, batch, length, args)
                if name != args.reference:
                    functions.update({(name, key): fn for key, fn in
                                      streaming_functions(model, dataset, batch, length, args).items()})
            for threads in args.threads:
                torch.set_num_threads(threads)
                samples = timed_side_by_side(functions, args)
                for name in [*args.models, args.reference]:
                    cell = {"model": name, "length": length, "batch": batch, "threads": threads,
                            "recompute_users": timed_users[name]}
                    scale = batch / timed_users[name]  # recomputing is linear in the users
                    record(cell, "recompute", {clock: [seconds * scale for seconds in values]
                                               for clock, values in samples[(name, "recompute")].items()})
                    for (model_name, key), values in samples.items():
                        if model_name == name and key != "recompute":
                            record(cell, key, values)
                    cells.append(cell)
                    common.progress(f"{name} L={length} batch={batch} threads={threads}: recompute "
                                    f"{cell['recompute_ms']['median']:.2f} ms" + (
                                        f", step + scores {cell['step_and_scores_ms']['median']:.3f} ms"
                                        if "step_and_scores_ms" in cell else ""))
    return cells


# ----------------------------------------------------------------------------------- reporting

def lookup(report):
    return {(c["model"], c["length"], c["batch"], c["threads"]): c for c in report["cells"]}


def median(cell, key):
    return cell[key]["median"]


def speedups(report):
    """Rows (model, L, batch, threads, step+scores ms, its recompute ms, reference's, the two ratios)."""
    s = report["settings"]
    cells = lookup(report)
    rows = []
    for model in s["models"]:
        for length in s["lengths"]:
            for batch in s["batch_sizes"]:
                for threads in s["threads"]:
                    ours, ref = cells[(model, length, batch, threads)], cells[(s["reference"], length, batch, threads)]
                    step = median(ours, "step_and_scores_ms")
                    rows.append({"model": model, "length": length, "batch": batch, "threads": threads,
                                 "step_ms": step, "recompute_ms": median(ours, "recompute_ms"),
                                 "reference_ms": median(ref, "recompute_ms"),
                                 "vs_self": median(ours, "recompute_ms") / step,
                                 "vs_reference": median(ref, "recompute_ms") / step,
                                 "vs_reference_cpu": median(ref, "recompute_cpu_ms") / median(ours, "step_and_scores_cpu_ms"),
                                 "recompute_users": ours["recompute_users"]})
    return rows


def events_per_second(report, batch):
    """Rows (model, threads, events/s of the step, with scores, through the store) at ``batch``."""
    s = report["settings"]
    rows = []
    for model in s["models"]:
        for threads in s["threads"]:
            cells = [c for c in report["cells"] if (c["model"], c["batch"], c["threads"]) == (model, batch, threads)]
            # The step does not depend on the history's length: the median over the lengths.
            rates = {key: batch / (statistics.median(median(c, key) for c in cells) / 1e3)
                     for key in ("step_ms", "step_cpu_ms", "step_and_scores_ms", "store_observe_ms")}
            rows.append({"model": model, "threads": threads, **rates})
    return rows


def render_markdown(report):
    s = report["settings"]
    text = [
        "# Streaming against recomputing", "",
        f"Machine: {common.machine_line(report['machine'])}. **Shared with other engineers' jobs while it "
        "ran**: absolute times move with their load; ratios measured side by side are steadier.", "",
        f"Settings: hidden size {s['hidden_size']}, {s['layers']} layer(s) for every model; {report['n_items']} "
        f"items; synthetic histories; torch threads {s['threads']} side by side; recomputation timed on at "
        f"most {s['recompute_users']} users (chunks of {s['recompute_chunk']}) and scaled to the batch; for each "
        f"(L, B) and thread count all measurements side by side: one warm-up call each, then "
        f"{s['min_repeats']} rounds of about {s['seconds'] / s['min_repeats']:.2f} s each (at least one call); "
        f"medians. Overrides {s['overrides'] or 'none'}.", "",
        "## Latency per call (ms) for B users, each appending one item to a history of L", "",
        f"`step + scores`: the state update and the scores of all items (what `full_sort_predict` returns); "
        f"`recompute`: `full_sort_predict` on the whole history, by the same model and by {s['reference']}. "
        "Wall-clock medians; the last column is the speed-up in CPU time (the process's, all threads).", "",
    ]
    headers = ["Model", "L", "B", "threads", "step + scores", "recompute (same model)",
               f"recompute ({s['reference']})", "speed-up vs same model", f"speed-up vs {s['reference']}",
               f"vs {s['reference']}, CPU time"]
    rows = [[r["model"], r["length"], r["batch"], r["threads"], f"{r['step_ms']:.3f}", f"{r['recompute_ms']:.2f}",
             f"{r['reference_ms']:.2f}", f"{r['vs_self']:.1f}x", f"**{r['vs_reference']:.1f}x**",
             f"{r['vs_reference_cpu']:.1f}x"] for r in speedups(report)]
    text += [common.markdown_table(headers, rows)]
    for batch in s["batch_sizes"]:
        text += [f"## Events per second, {batch} user(s) per call", "",
                 "Medians over the history lengths (a step does not depend on them); wall-clock, and for the step "
                 "also by CPU time.", "",
                 common.markdown_table(["Model", "threads", "step", "step (CPU time)", "step + scores",
                                        "StateStore.observe"],
                                       [[r["model"], r["threads"], f"{r['step_ms']:,.0f}", f"{r['step_cpu_ms']:,.0f}",
                                         f"{r['step_and_scores_ms']:,.0f}", f"{r['store_observe_ms']:,.0f}"]
                                        for r in events_per_second(report, batch)])]
    memory = report["memory"]
    text += ["## State memory per user (bytes)", "",
             f"{s['reference']}: the keys and values a KV-cached Transformer keeps, 2 x layers x L x hidden "
             "float32; ours: the whole streaming state (every layer's convolution tail and SSM state, the "
             "representation), whatever L.", "",
             common.markdown_table(["L", f"{s['reference']} keys + values"] + [f"{m} state" for m in s["models"]],
                                   [[length, f"{memory['reference'][str(length)]:,}"]
                                    + [f"{memory['models'][m]:,}" for m in s["models"]] for length in s["lengths"]])]
    text += ["## Targets", "", common.markdown_table(["target", "measured", "met"], target_rows(report))]
    return "\n".join(text)


def target_rows(report):
    s = report["settings"]
    rows = []
    for length, key in ((200, "speedup_vs_reference_at_200"), (2000, "speedup_vs_reference_at_2000")):
        for r in speedups(report):
            if r["length"] == length:
                rows.append([f">= {TARGETS[key]}x lower latency than {s['reference']}'s recompute, L={length}",
                             f"{r['model']}, B={r['batch']}, {r['threads']} thread(s): {r['vs_reference']:.1f}x",
                             "yes" if r["vs_reference"] >= TARGETS[key] else "**no**"])
    if 1024 in s["batch_sizes"]:
        for r in events_per_second(report, 1024):
            rows.append([f">= {TARGETS['events_per_second_at_1024']:,} events/s, 1,024 users, hidden "
                         f"{s['hidden_size']}, {s['layers']} layer(s)",
                         f"{r['model']}, {r['threads']} thread(s): step {r['step_ms']:,.0f}, with scores "
                         f"{r['step_and_scores_ms']:,.0f}",
                         "yes" if r["step_ms"] >= TARGETS["events_per_second_at_1024"] else "**no**"])
    return rows


def plot(report, path):
    """Log-log: latency against L for 1 user and for the largest batch; memory per user against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    cells = lookup(report)
    batches = [min(s["batch_sizes"]), max(s["batch_sizes"])] if len(s["batch_sizes"]) > 1 else s["batch_sizes"]
    figure, axes = plt.subplots(1, len(batches) + 1, figsize=(6 * (len(batches) + 1), 5.5))
    styles = {threads: style for threads, style in zip(s["threads"], ("-", "--", ":", "-."))}
    first = s["threads"][0]
    for axis, batch in zip(axes, batches):
        for threads in s["threads"]:
            def line(values, marker, color, label, alpha=1.0):  # a legend entry for the first thread count only
                axis.plot(s["lengths"], values, marker + styles[threads], color=color, alpha=alpha,
                          label=label if threads == first else None)

            for index, model in enumerate(s["models"]):
                line([median(cells[(model, length, batch, threads)], "step_and_scores_ms") for length in s["lengths"]],
                     "o", f"C{index}", f"{model}: step + scores")
                line([median(cells[(model, length, batch, threads)], "recompute_ms") for length in s["lengths"]],
                     "s", f"C{index}", f"{model}: recompute", alpha=0.5)
            line([median(cells[(s["reference"], length, batch, threads)], "recompute_ms") for length in s["lengths"]],
                 "^", "black", f"{s['reference']}: recompute")
        axis.set_title(f"One new item for each of {batch} user(s)\n"
                       + ", ".join(f"{'solid dashed dotted dash-dot'.split()[i]}: {t} thread(s)"
                                   for i, t in enumerate(s["threads"])), fontsize=10)
        axis.set_ylabel("ms per call")
    memory = report["memory"]
    axis = axes[-1]
    axis.plot(s["lengths"], [memory["reference"][str(length)] for length in s["lengths"]], "^-", color="black",
              label=f"{s['reference']} keys + values")
    for index, model in enumerate(s["models"]):
        axis.plot(s["lengths"], [memory["models"][model]] * len(s["lengths"]), "o-", color=f"C{index}",
                  label=f"{model} state")
    axis.set_title("Memory per user")
    axis.set_ylabel("bytes")
    for axis in axes:
        common.log_log_lengths(axis, s["lengths"], "history length L", legend_fontsize=7)
    figure.suptitle(f"{report['machine']['cpu']}, hidden {s['hidden_size']}, {s['layers']} layer(s), "
                    f"{report['n_items']} items", fontsize=11)
    return common.save_figure(figure, path)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        common.rewrite_reports(args.from_json, render_markdown, plot)
        return 0
    common.check_models_registered([*args.models, args.reference])
    from recbole_ssm.replay import streaming_models

    if set(args.models) - set(streaming_models()):
        raise SystemExit(f"--models {' '.join(sorted(set(args.models) - set(streaming_models())))}: these do "
                         f"not stream; the models that do are {', '.join(streaming_models())}")
    overrides = common.parse_overrides(args.overrides)
    report = {
        "benchmark": "streaming",
        "settings": {"models": args.models, "reference": args.reference, "lengths": args.lengths,
                     "batch_sizes": args.batch_sizes, "threads": args.threads, "hidden_size": args.hidden_size,
                     "layers": args.layers, "recompute_users": args.recompute_users,
                     "recompute_chunk": args.recompute_chunk, "seconds": args.seconds,
                     "min_repeats": args.min_repeats, "max_repeats": args.max_repeats, "overrides": overrides},
        "machine": common.machine_info("cpu"),
    }
    with tempfile.TemporaryDirectory(prefix="recbole-ssm-streaming-") as data_root:
        write_synthetic_dataset(data_root)
        models = build_models(args, overrides, data_root)
        reference, _, reference_config = models[args.reference]
        report["n_items"] = reference.n_items
        report["memory"] = {
            "reference": {str(length): kv_cache_bytes_per_user(reference_config, length) for length in args.lengths},
            "models": {name: state_bytes_per_user(models[name][0]) for name in args.models},
        }
        report["cells"] = run_all(args, models)
    common.save_reports(report, args.output_dir / "streaming", render_markdown, plot)
    return 0


if __name__ == "__main__":
    common.import_recbole_ssm()
    sys.exit(main())
