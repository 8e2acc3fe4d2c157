"""Ranking quality: train and test each model through RecBole's own trainer and evaluator, with the
same data, split, metrics and training settings for all, over one or more seeds.

    python -m benchmarks.quality                                  # all six models, ml-100k, seed 2020
    python -m benchmarks.quality --models SASRec Mamba4Rec --seeds 2020 2021 2022 --epochs 50
    python -m benchmarks.quality --dataset ml-1m --config-files benchmarks/configs/ml-1m.yaml \
        --set MAX_ITEM_LIST_LENGTH=200 --device cuda

Writes ``quality-<dataset>.json`` (every run, every epoch) and ``quality-<dataset>.md`` (mean and
standard deviation over seeds) into --output-dir; a progress line per model and epoch goes to stderr.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import common

METRICS = ("hit@10", "ndcg@10", "mrr@10")
METRIC_TITLES = {"hit@10": "HR@10", "ndcg@10": "NDCG@10", "mrr@10": "MRR@10"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(common.DEFAULT_MODELS),
                        help="RecBole model names (default: %(default)s)")
    parser.add_argument("--dataset", default="ml-100k",
                        help="RecBole dataset name; ml-100k ships with RecBole (default: %(default)s)")
    parser.add_argument("--config-files", nargs="+", type=Path,
                        help="YAML files with the shared settings (default: benchmarks/configs/"
                             "<dataset>.yaml, else yaml_configs/<dataset>.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020],
                        help="one run per seed; the report gives mean and std (default: %(default)s)")
    parser.add_argument("--epochs", type=int, help="maximum training epochs (default: from the YAML)")
    parser.add_argument("--stopping-step", type=int,
                        help="early stopping after this many epochs without a better valid score")
    parser.add_argument("--hidden-size", type=int, default=common.DEFAULT_HIDDEN_SIZE,
                        help="width of every model, see benchmarks/common.py (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=common.DEFAULT_LAYERS,
                        help="depth of every model (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=common.DEFAULT_OUTPUT_DIR,
                        help="where the JSON and Markdown go (default: benchmarks/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="RecBole config override for every model, value in YAML "
                             "(e.g. --set MAX_ITEM_LIST_LENGTH=20); repeatable")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's default; 1 is steadier on a "
                             "shared machine)")
    parser.add_argument("--latency-repeats", type=int, default=3,
                        help="timed passes of full_sort_predict over the test set (default: %(default)s)")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="train nothing: rewrite the Markdown of an earlier run's JSON next to it")
    parser.add_argument("--recbole-log", action="store_true",
                        help="also show RecBole's own logging (and write its log/ files)")
    args = parser.parse_args(argv)
    if args.config_files is None:
        candidates = [common.CONFIG_DIR / f"{args.dataset}.yaml",
                      common.REPO_ROOT / "yaml_configs" / f"{args.dataset}.yaml"]
        found = [path for path in candidates if path.exists()]
        if not found:
            parser.error(f"no {' or '.join(map(str, candidates))}; pass --config-files for "
                         f"dataset {args.dataset!r}")
        args.config_files = found[:1]
    return args


class EpochRecorder:
    """Times each training epoch and each validation of a RecBole trainer, notes the best epoch and
    prints one line per epoch."""

    def __init__(self, trainer, label, max_epochs):
        self.trainer = trainer
        self.label = label
        self.max_epochs = max_epochs
        self.epochs = []
        self.best_epoch = None
        self._train_end = None
        train_epoch = trainer._train_epoch

        def timed_train_epoch(train_data, epoch_idx, *args, **kwargs):
            start = time.perf_counter()
            loss = train_epoch(train_data, epoch_idx, *args, **kwargs)
            common.synchronize(trainer.device)
            self._train_end = time.perf_counter()
            self.epochs.append({"epoch": epoch_idx, "train_seconds": self._train_end - start,
                                "train_loss": float(sum(loss) if isinstance(loss, tuple) else loss)})
            return loss

        trainer._train_epoch = timed_train_epoch

    def after_validation(self, epoch_idx, valid_score):
        """RecBole's fit callback: runs after each validation (and after saving a new best)."""
        record = self.epochs[-1]
        record["valid_seconds"] = time.perf_counter() - self._train_end
        record["valid_score"] = float(valid_score)
        if self.trainer.cur_step == 0:  # RecBole's early stopping just reset: a new best
            self.best_epoch = epoch_idx
        common.progress(
            f"{self.label} epoch {epoch_idx + 1}/{self.max_epochs}: train {record['train_seconds']:.1f}s"
            f" loss {record['train_loss']:.4f} | valid {valid_score:.4f} in "
            f"{record['valid_seconds']:.1f}s (best {self.trainer.best_valid_score:.4f} "
            f"@ epoch {self.best_epoch + 1})")


def time_test_inference(model, batches, repeats, device):
    """Timing summary (ms) of whole passes of ``full_sort_predict`` over the given test batches."""
    import torch

    def one_pass():
        with torch.no_grad():
            for interaction in batches:
                model.full_sort_predict(interaction)

    model.eval()
    return common.summarize_ms(common.time_repeated(one_pass, repeats, warmup=1, device=device))


def run_one(model_name, seed, args, overrides):
    """Train, validate and test one model with one seed; everything measured, as a dict."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_logger, init_seed

    label = f"{model_name} seed={seed}"
    checkpoint_dir = tempfile.mkdtemp(prefix="recbole-ssm-quality-")
    base = {"seed": seed, "checkpoint_dir": checkpoint_dir}
    if args.epochs is not None:
        base["epochs"] = args.epochs
    if args.stopping_step is not None:
        base["stopping_step"] = args.stopping_step
    try:
        config = common.make_config(model_name, args.dataset, args.config_files, base,
                                    args.hidden_size, args.layers, args.device, overrides)
        if args.recbole_log:
            init_logger(config)
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = common.build_model(config, train_data._dataset)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        recorder = EpochRecorder(trainer, label, config["epochs"])
        common.progress(f"{label}: training up to {config['epochs']} epochs "
                        f"(early stopping after {config['stopping_step']})")
        start = time.perf_counter()
        trainer.fit(train_data, valid_data, verbose=args.recbole_log, saved=True,
                    show_progress=False, callback_fn=recorder.after_validation)
        fit_seconds = time.perf_counter() - start

        test_batches = []
        full_sort_predict = model.full_sort_predict  # bound method of the class

        def recording_full_sort_predict(interaction):
            test_batches.append(interaction)
            return full_sort_predict(interaction)

        model.full_sort_predict = recording_full_sort_predict  # notes the test batches
        try:
            test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        finally:
            del model.full_sort_predict  # the class's method again
        latency = time_test_inference(model, test_batches, args.latency_repeats, config["device"])
        n_users = sum(len(batch) for batch in test_batches)
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    train_seconds = [epoch["train_seconds"] for epoch in recorder.epochs]
    result = {
        "model": model_name,
        "seed": seed,
        "test": {metric: float(test_result[metric]) for metric in METRICS},
        "best_valid": {k: float(v) for k, v in (trainer.best_valid_result or {}).items()},
        "best_epoch": None if recorder.best_epoch is None else recorder.best_epoch + 1,
        "epochs_run": len(recorder.epochs),
        "train_seconds_per_epoch": sum(train_seconds) / len(train_seconds) if train_seconds else None,
        "fit_seconds": fit_seconds,
        "test_latency_ms_per_batch": latency["median"] / len(test_batches),
        "test_latency_ms_per_user": latency["median"] / n_users,
        "test_latency_pass_ms": latency,
        "test_batches": len(test_batches),
        "test_users": n_users,
        **common.count_parameters(model),
        "architecture": common.width_depth_of(config, model_name),
        "MAX_ITEM_LIST_LENGTH": config["MAX_ITEM_LIST_LENGTH"],
        "epochs": recorder.epochs,
    }
    common.progress(
        f"{label}: test " + ", ".join(f"{METRIC_TITLES[m]} {result['test'][m]:.4f}" for m in METRICS)
        + f" (best epoch {result['best_epoch']}, {result['train_seconds_per_epoch']:.1f}s/epoch)")
    return result


def run_in_fresh_process(model_name, seed, args, overrides):
    """:func:`run_one` in a Python process of its own, so that no run inherits the heap, caches or
    global torch state of the runs before it: in one long process, Mamba4Rec's epochs took twice as
    long after three other models had trained as they do in a fresh one (with identical losses).
    An exception in the run is raised here, with the run's traceback attached."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_worker,
                                                initargs=(args.threads,)) as worker:
        return worker.submit(run_one, model_name, seed, args, overrides).result()


def _start_worker(threads):
    common.import_recbole_ssm()
    if threads:
        import torch

        torch.set_num_threads(threads)


def summarize(runs, models):
    """Mean and std over seeds, per model, in the order asked for."""
    summary = []
    for model in models:
        done = [run for run in runs if run["model"] == model and "error" not in run]
        failed = [run for run in runs if run["model"] == model and "error" in run]
        row = {"model": model, "seeds": [run["seed"] for run in done],
               "failed_seeds": [run["seed"] for run in failed]}
        if done:
            for metric in METRICS:
                row[metric] = common.mean_std([run["test"][metric] for run in done])
            for key in ("test_latency_ms_per_batch", "test_latency_ms_per_user",
                        "train_seconds_per_epoch", "best_epoch", "epochs_run"):
                row[key] = common.mean_std([run[key] for run in done])
            row["params"] = done[0]["params"]
            row["params_without_embeddings"] = done[0]["params_without_embeddings"]
            row["architecture"] = done[0]["architecture"]
        else:
            row["error"] = ("failed: " + failed[0]["error"].strip().splitlines()[-1][:100]
                            if failed else "not run yet")
        summary.append(row)
    return summary


def comparison_lines(summary):
    """Each model's NDCG@10 against the reference model's, in units of the reference's seed spread."""
    reference = next((row for row in summary if row["model"] == common.REFERENCE_MODEL
                      and "error" not in row), None)
    if reference is None:
        return []
    ref_mean, ref_std = reference["ndcg@10"]
    lines = []
    for row in summary:
        if row is reference or "error" in row:
            continue
        mean, _ = row["ndcg@10"]
        delta = mean - ref_mean
        if ref_std is None:
            verdict = "no seed spread with one seed"
        elif delta >= 0:
            verdict = "at or above " + common.REFERENCE_MODEL
        elif -delta <= ref_std:
            verdict = "within one seed-std of " + common.REFERENCE_MODEL
        else:
            verdict = f"below {common.REFERENCE_MODEL} by {-delta / ref_std:.1f} seed-std"
        lines.append(f"- {row['model']}: NDCG@10 {mean:.4f} vs {common.REFERENCE_MODEL} "
                     f"{ref_mean:.4f} (Δ {delta:+.4f}; {verdict})")
    return lines


def render_markdown(report):
    """The Markdown report: settings, the machine, the table and the comparison to the reference."""
    settings = report["settings"]
    headers = ["Model", "HR@10", "NDCG@10", "MRR@10", "Latency (ms / full-sort batch)",
               "Latency (ms / user)", "# Params", "# Params w/o emb.", "Best epoch",
               "Train s / epoch", "Seeds"]
    rows = []
    for row in report["summary"]:
        if "error" in row:
            rows.append([row["model"], row["error"]] + [""] * (len(headers) - 2))
            continue
        seeds = ", ".join(map(str, row["seeds"]))
        if row["failed_seeds"]:
            seeds += f" (failed: {', '.join(map(str, row['failed_seeds']))})"
        rows.append([
            row["model"],
            *(common.format_mean_std(*row[m]) for m in METRICS),
            common.format_mean_std(*row["test_latency_ms_per_batch"], digits=1),
            common.format_mean_std(*row["test_latency_ms_per_user"], digits=3),
            common.format_count(row["params"]),
            common.format_count(row["params_without_embeddings"]),
            common.format_mean_std(*row["best_epoch"], digits=1),
            common.format_mean_std(*row["train_seconds_per_epoch"], digits=1),
            seeds,
        ])
    text = [
        f"# Quality: {settings['dataset']}",
        "",
        f"Machine: {common.machine_line(report['machine'])}.",
        "",
        f"Settings: {', '.join(map(common.display_path, settings['config_files']))}; hidden size {settings['hidden_size']}, "
        f"{settings['layers']} layers for every model; seeds {settings['seeds']}; epochs "
        f"{settings['epochs']}, early stopping {settings['stopping_step']}; overrides "
        f"{settings['overrides'] or 'none'}; torch threads "
        f"{settings.get('threads') or report['machine']['torch_threads']}. Test metrics at the best validation epoch "
        "(NDCG@10), mean ± sample std over seeds. Latency: median of "
        f"{settings['latency_repeats']} timed passes of `full_sort_predict` over the test users "
        "(after one warm-up pass), per batch of up to eval_batch_size users and per user.",
        "",
        common.markdown_table(headers, rows),
    ]
    comparison = comparison_lines(report["summary"])
    if comparison:
        text += [f"NDCG@10 against {common.REFERENCE_MODEL}:", "", *comparison, ""]
    return "\n".join(text)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        markdown = render_markdown(json.loads(args.from_json.read_text()))
        common.write_text(args.from_json.with_suffix(".md"), markdown)
        print(markdown)
        return 0
    common.check_models_registered(args.models)
    overrides = common.parse_overrides(args.overrides)
    common.device_overrides(args.device)  # fail early on a missing GPU
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "quality",
        "settings": {
            "models": args.models, "dataset": args.dataset,
            "config_files": [common.display_path(p) for p in args.config_files], "seeds": args.seeds,
            "epochs": args.epochs if args.epochs is not None else "from YAML",
            "stopping_step": args.stopping_step if args.stopping_step is not None else "from YAML",
            "hidden_size": args.hidden_size, "layers": args.layers, "device": args.device,
            "overrides": overrides, "latency_repeats": args.latency_repeats,
            "threads": args.threads,
        },
        "machine": common.machine_info(args.device),
        "runs": [],
    }
    stem = args.output_dir / f"quality-{args.dataset}"
    for model in args.models:
        for seed in args.seeds:
            try:
                run = run_in_fresh_process(model, seed, args, overrides)
            except Exception:  # keep the other runs; the failure is reported, never dropped
                error = traceback.format_exc()
                common.progress(f"{model} seed={seed} FAILED:\n{error}")
                run = {"model": model, "seed": seed, "error": error}
            report["runs"].append(run)
            report["summary"] = summarize(report["runs"], args.models)
            common.write_json(stem.with_suffix(".json"), report)  # after every run: partial results
            common.write_text(stem.with_suffix(".md"), render_markdown(report))
    common.progress(f"wrote {stem}.json and {stem}.md")
    print(render_markdown(report))
    return 1 if any("error" in run for run in report["runs"]) else 0


if __name__ == "__main__":
    common.import_recbole_ssm()
    sys.exit(main())
