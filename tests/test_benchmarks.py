"""Smoke test of the benchmarks: both commands run end to end on tiny settings and write sane JSON,
Markdown and (efficiency) PNG, so that they never rot. Figures are not checked: they are benchmarks."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ["SASRec", "Mamba4Rec"]
TINY = ["--models", *MODELS, "--hidden-size", "8", "--layers", "1", "--set", "d_state=4"]


def run_benchmark(module, *args):
    """Run ``python -m benchmarks.<module>`` in the test's own folder (RecBole writes log_tensorboard/
    there), with the repository on the import path."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"benchmarks.{module} failed:\n{done.stderr[-4000:]}"
    return done


def table_rows(markdown, first_cell):
    return [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]


def test_quality_smoke(tmp_path):
    # ml-100k users with at most 30 ratings (~200 users), histories of 5: seconds per epoch.
    run_benchmark("quality", *TINY, "--epochs", "1", "--seeds", "2020", "--latency-repeats", "1",
                  "--set", "MAX_ITEM_LIST_LENGTH=5", "--set", 'user_inter_num_interval="[5,30]"',
                  "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "quality-ml-100k.json").read_text())
    assert [run["model"] for run in report["runs"]] == MODELS
    for run in report["runs"]:
        assert "error" not in run
        assert set(run["test"]) == {"hit@10", "ndcg@10", "mrr@10"}
        assert all(0.0 <= value <= 1.0 for value in run["test"].values())
        assert run["test"]["mrr@10"] <= run["test"]["ndcg@10"] <= run["test"]["hit@10"]
        assert run["test_latency_ms_per_batch"] > 0 and run["test_latency_ms_per_user"] > 0
        assert run["params"] > run["params_without_embeddings"] > 0
        assert run["best_epoch"] == 1 and run["epochs_run"] == 1
        assert run["train_seconds_per_epoch"] > 0
    markdown = (tmp_path / "quality-ml-100k.md").read_text()
    for model in MODELS:
        assert len(table_rows(markdown, model)) == 1


def test_efficiency_smoke(tmp_path):
    lengths = [8, 16]
    run_benchmark("efficiency", *TINY, "--lengths", *map(str, lengths), "--batch-size", "2",
                  "--repeats", "1", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "efficiency.json").read_text())
    cells = {(cell["model"], cell["length"]): cell for cell in report["cells"]}
    assert set(cells) == {(model, length) for model in MODELS for length in lengths}
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        for timing in ("inference_batch_ms", "inference_single_ms", "train_step_ms"):
            assert 0 < cell[timing]["min"] <= cell[timing]["median"] <= cell[timing]["max"]
        assert cell["memory"]["inference_bytes"] >= 0 and cell["memory"]["train_bytes"] >= 0
        assert cell["params"] > cell["params_without_embeddings"] > 0
    markdown = (tmp_path / "efficiency.md").read_text()
    for model in MODELS:
        for length in lengths:
            assert len(table_rows(markdown, f"{model} | {length}")) == 1
    png = (tmp_path / "efficiency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
