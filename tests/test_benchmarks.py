"""Smoke test of the benchmarks: every command runs end to end on tiny settings and writes sane JSON,
Markdown and (efficiency) PNG, so that they never rot. Figures are not checked: they are benchmarks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ["SASRec", "Mamba4Rec"]
TINY = ["--models", *MODELS, "--hidden-size", "8", "--layers", "1", "--set", "d_state=4"]


def run_benchmark(module, *args, **environment):
    """Run ``python -m benchmarks.<module>`` in the test's own folder (RecBole writes log_tensorboard/
    there), with the repository on the import path and ``environment`` set."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **environment}
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


def test_speedup_smoke(tmp_path):
    # BERT4Rec too: its model reads config keys that its batch transform sets, so the models must be
    # built as the efficiency benchmark builds them (the transform first).
    models = [*MODELS, "BERT4Rec"]
    run_benchmark("speedup", *TINY, "--models", *models, "--shapes", "train:3x8", "infer:2x8",
                  "--threads", "1", "2", "--rounds", "2", "--min-seconds", "0", "--output-dir", str(tmp_path),
                  OMP_WAIT_POLICY="PASSIVE")
    report = json.loads((tmp_path / "speedup.json").read_text())
    assert report["machine"]["openmp_environment"]["OMP_WAIT_POLICY"] == "PASSIVE"   # recorded, and shown:
    assert "OMP_WAIT_POLICY=PASSIVE" in (tmp_path / "speedup.md").read_text().splitlines()[2]
    assert [(run["threads"], run["kind"]) for run in report["runs"]] == [
        (1, "train"), (1, "infer"), (2, "train"), (2, "infer")]
    assert len({run["process_id"] for run in report["runs"]}) == 4   # each shape in a fresh process
    for run in report["runs"]:
        assert set(run["models"]) == set(models)
        for timing in run["models"].values():
            assert timing["wall_ms"]["n"] == 2 and timing["cpu_ms"]["n"] == 2
            assert 0 < timing["wall_ms"]["min"] <= timing["wall_ms"]["max"] and timing["first_call_ms"] > 0
    markdown = (tmp_path / "speedup.md").read_text()
    assert len(table_rows(markdown, "1")) == 4 and len(table_rows(markdown, "2")) == 4  # speed-ups, first calls


def test_speedup_adds_rounds_until_min_seconds(tmp_path):
    """Small calls get more rounds than --rounds, up to --max-rounds, until the timed calls add up to
    --min-seconds; every model gets the same number, shown in the table."""
    run_benchmark("speedup", *TINY, "--shapes", "infer:2x8", "--threads", "1", "--rounds", "2",
                  "--min-seconds", "0.05", "--max-rounds", "400", "--output-dir", str(tmp_path))
    run = json.loads((tmp_path / "speedup.json").read_text())["runs"][0]
    timings = [run["models"][m]["wall_ms"] for m in MODELS]
    rounds = timings[0]["n"]
    assert all(t["n"] == rounds for t in timings) and 2 < rounds <= 400
    timed_seconds = sum(t["mean"] * t["n"] for t in timings) / 1e3
    assert rounds == 400 or 0.05 <= timed_seconds < 0.05 + sum(t["max"] for t in timings) / 1e3
    assert table_rows((tmp_path / "speedup.md").read_text(), "1")[0].split(" | ")[2] == str(rounds)


def test_speedup_rejects_fewer_max_rounds_than_rounds(capsys):
    from benchmarks import speedup

    with pytest.raises(SystemExit) as exit_info:
        speedup.parse_args(["--rounds", "5", "--max-rounds", "3"])
    assert exit_info.value.code == 2
    assert "--max-rounds >= --rounds (5)" in capsys.readouterr().err


def test_kernels_smoke(tmp_path):
    """Both backends of every op, and the first calls (each op's, then two blocks' inference for one user
    on two threads) compiled into an empty cache then loaded from it."""
    run_benchmark("kernels", "--shapes", "2x6", "--rounds", "1", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "kernels.json").read_text())
    ops = {row["op"] for row in report["rows"]}
    blocks = {f"{block} block without gradients, one user, 2 threads" for block in ("Mamba-1", "Hydra")}
    assert len(ops) == 5 and set(report["first_calls"]["compile"]) == ops | blocks
    for row in report["rows"]:
        for kind in ("forward", "forward_backward"):
            assert row[kind]["torch"]["median"] > 0 and row[kind]["numba"]["median"] > 0
    assert sum(report["first_calls"]["load_from_cache"].values()) < sum(report["first_calls"]["compile"].values())
    assert len(table_rows((tmp_path / "kernels.md").read_text(), "total")) == 1


def test_streaming_smoke(tmp_path):
    lengths, batches = [8, 16], [1, 3]
    run_benchmark("streaming", "--hidden-size", "8", "--set", "d_state=4", "--lengths", *map(str, lengths),
                  "--batch-sizes", *map(str, batches), "--threads", "1", "--seconds", "0.01", "--min-repeats", "1",
                  "--recompute-users", "2", "--recompute-chunk", "1", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "streaming.json").read_text())
    cells = {(c["model"], c["length"], c["batch"]): c for c in report["cells"]}
    streaming = ["Mamba4Rec", "Mamba2Rec"]
    assert set(cells) == {(m, length, b) for m in streaming + ["SASRec"] for length in lengths for b in batches}
    for (model, length, batch), cell in cells.items():
        assert cell["recompute_ms"]["median"] > 0 and cell["recompute_users"] == min(batch, 2)
        timings = ("step_ms", "step_and_scores_ms", "store_observe_ms") if model in streaming else ()
        assert all(0 < cell[t]["min"] <= cell[t]["median"] <= cell[t]["max"] for t in timings)
    memory = report["memory"]
    assert memory["reference"] == {str(length): 2 * 1 * length * 8 * 4 for length in lengths}  # K and V, float32
    assert all(0 < memory["models"][m] < memory["reference"]["16"] for m in streaming)
    markdown = (tmp_path / "streaming.md").read_text()
    for model in streaming:
        assert len(table_rows(markdown, f"{model} | 16 | 3 | 1")) == 1
    png = (tmp_path / "streaming.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_parameter_counts_reproduce_the_published_sasrec():
    """Our counting (RecBole's item table with the padding row, embeddings = nn.Embedding weights)
    gives exactly the Hydra4Rec paper's SASRec counts on its ML-1M and Beauty item counts; our
    Mamba4Rec differs from another item count by 64 parameters per item, its embedding width."""
    from benchmarks.parameter_counts import ITEMS, PUBLISHED, count

    for dataset in ("ML-1M", "Beauty_and_Personal_Care"):
        ours = count("SASRec", ITEMS[dataset])
        assert (ours["params"], ours["params_without_embeddings"]) == PUBLISHED[dataset]["SASRec"]
    small, large = count("Mamba4Rec", 3417), count("Mamba4Rec", 3418)
    assert large["params"] - small["params"] == 64
    assert large["params_without_embeddings"] == small["params_without_embeddings"]
