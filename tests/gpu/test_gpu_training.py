"""run_recbole trains each model on the GPU through the fused kernels, on ml-100k with the benchmarks'
protocol (leave-one-out by time, full ranking), to metrics above random and above RecBole's Pop."""
from pathlib import Path

import pytest
from recbole.config import Config
from recbole.data import create_dataset
from recbole.quick_start import run_recbole

import recbole_ssm  # noqa: F401  (registers the models with RecBole)
from tests.conftest import MODELS

pytestmark = pytest.mark.gpu

PROTOCOL = str(Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "ml-100k.yaml")
# Ten epochs without validation (the last epoch is tested): a few seconds per epoch on a GPU.
SHORT = {"epochs": 10, "eval_step": 0, "show_progress": False}


@pytest.fixture(scope="module")
def pop(tmp_path_factory):
    """RecBole's most-popular baseline on the same split, and the HR@10 of a random ranking there."""
    settings = {**SHORT, "epochs": 1, "checkpoint_dir": str(tmp_path_factory.mktemp("pop"))}
    result = run_recbole(model="Pop", dataset="ml-100k", config_file_list=[PROTOCOL], config_dict=settings)
    items = create_dataset(Config(model="Pop", dataset="ml-100k", config_file_list=[PROTOCOL])).item_num
    return result["test_result"], 10 / (items - 1)  # item_num counts the padding id


@pytest.mark.parametrize("model", MODELS)
def test_run_recbole_on_the_gpu(model, pop, tmp_path, record_property):
    baseline, random_hit_rate = pop
    result = run_recbole(model=model, dataset="ml-100k", config_file_list=[PROTOCOL],
                         config_dict={**SHORT, "ssm_backend": "cuda", "checkpoint_dir": str(tmp_path)})
    test = result["test_result"]
    record_property("test result", dict(test))
    record_property("Pop test result", dict(baseline))
    assert 0 < test["mrr@10"] <= test["ndcg@10"] <= test["hit@10"] <= 1
    assert baseline["hit@10"] > random_hit_rate
    assert test["hit@10"] > baseline["hit@10"] and test["ndcg@10"] > baseline["ndcg@10"], (dict(test),
                                                                                           dict(baseline))
