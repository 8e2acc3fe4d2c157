"""The run_recbole console script, end to end on RecBole's bundled ml-100k."""
import glob
import subprocess

import pytest
from recbole.quick_start import run_recbole

from recbole_ssm.cli import build_parser, main
from tests.conftest import RUN_RECBOLE, TINY, evaluate_checkpoint, logged_result


def random_hit_rate(n_items, k=10):
    """HR@k of a random full ranking: the held-out item is among k of the n_items - 1 candidates."""
    return k / (n_items - 1)


def test_flags_of_recboles_script():
    args, overrides = build_parser().parse_known_args(
        ["--model=Hydra4Rec", "--dataset", "ml-1m", "--config_files=a.yaml b.yaml", "--nproc=2",
         "--ip=10.0.0.1", "--port=1234", "--world_size=4", "--group_offset=2", "--epochs=3"])
    assert (args.model, args.dataset, args.config_files) == ("Hydra4Rec", "ml-1m", "a.yaml b.yaml")
    assert (args.nproc, args.ip, args.port, args.world_size, args.group_offset) == (2, "10.0.0.1", 1234, 4, 2)
    assert overrides == ["--epochs=3"]  # left for RecBole's Config to read


def test_unknown_model(capsys):
    assert main(["--model=Mamba3Rec"]) == 2
    error = capsys.readouterr().err
    assert "unknown model 'Mamba3Rec'" in error
    assert "Hydra4Rec, Mamba2Rec, Mamba4Rec" in error


def test_run_recbole_console_script(tmp_path):
    """Train, validate and test Mamba4Rec; metrics finite and well above a random ranking; the
    saved checkpoint reloads and reproduces the test result."""
    options = {**TINY, "epochs": 1, "checkpoint_dir": str(tmp_path)}
    command = [RUN_RECBOLE, "--model=Mamba4Rec", "--dataset=ml-100k"]
    command += [f"--{key}={value}" for key, value in options.items()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    test_result = logged_result(output, "test result")

    checkpoint, = glob.glob(str(tmp_path / "Mamba4Rec-*.pth"))
    dataset, _, again = evaluate_checkpoint(checkpoint)
    assert 0 < test_result["ndcg@10"] <= test_result["hit@10"] <= 1
    assert test_result["hit@10"] > 3 * random_hit_rate(dataset.item_num - 1)
    assert again["ndcg@10"] == pytest.approx(test_result["ndcg@10"], abs=1e-4)


@pytest.mark.parametrize("model", ["Mamba2Rec", "Hydra4Rec"])
def test_run_recbole_api(model, tiny_settings, ml100k):
    result = run_recbole(model=model, dataset="ml-100k", config_dict={**tiny_settings, "epochs": 1})
    test_result = result["test_result"]
    assert 0 < test_result["ndcg@10"] <= test_result["hit@10"] <= 1
    assert test_result["hit@10"] > 3 * random_hit_rate(ml100k[0].item_num - 1)
