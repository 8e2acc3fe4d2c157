"""The replay command: on a tiny model trained by RecBole, the streamed ranks of each user's last event
give RecBole's own full-ranking test metrics; checkpoints it cannot replay get errors that say why."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_seed

from recbole_ssm import replay
from recbole_ssm.serving import StateStore
from tests.streaming_setup import STREAMING_MODELS

METRICS = ("hit@10", "ndcg@10", "mrr@10")
# ml-100k users with 20 to 30 ratings (a few thousand events); histories up to 50 items, so that
# RecBole's evaluation sees each test event's whole history, as the streamed state does.
SMALL = {"user_inter_num_interval": "[20,30]", "MAX_ITEM_LIST_LENGTH": 50, "epochs": 1,
         "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10", "metric_decimal_place": 12}


@pytest.fixture(scope="module", params=STREAMING_MODELS)
def trained(request, make_config):
    """(checkpoint path, RecBole's test metrics of its best model) of a tiny model trained one epoch."""
    config = make_config(request.param, **SMALL)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True, model_file=trainer.saved_model_file,
                              show_progress=False)
    return trainer.saved_model_file, {name: float(result[name]) for name in METRICS}


def test_replay_of_the_test_events_equals_recbole_evaluation(trained, tmp_path, capsys):
    checkpoint, recbole_test = trained
    report_file, states_file = tmp_path / "replay.json", tmp_path / "states.pt"
    assert replay.main([str(checkpoint), "--batch-size", "64", "--no-progress", "--json", str(report_file),
                        "--save-states", str(states_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["test_events_longer_than_max_item_list_length"] == 0
    assert report["test"]["events"] == report["users"] > 100  # one test event per user
    for name in METRICS:
        assert report["test"][name] == pytest.approx(recbole_test[name], abs=1e-9), name
    every = report["all_events_with_history"]
    assert every["events"] == report["events"] - report["users"]  # each user's first event has no history
    assert 0 < every["mrr@10"] <= every["ndcg@10"] <= every["hit@10"] < 1
    assert report["events_per_second"] > 0 and 0 < report["latency_ms"]["median"] <= report["latency_ms"]["p99"]
    assert report["memory_per_user_bytes"]["state"] > 0
    printed = capsys.readouterr().out
    assert f"test part ({report['users']:,} events): HR@10 {report['test']['hit@10']:.4f}" in printed
    assert "events/s; latency per event: median" in printed

    _, model, *_ = replay.load(checkpoint)
    store = StateStore.load(states_file, model)
    assert len(store) == report["users"] and int(store.event_counts(store.users).sum()) == report["events"]


def write_checkpoint(path, config, **extra):
    torch.save({"config": config, "state_dict": {}, "other_parameter": None, **extra}, path)
    return path


class Payload:
    """Stands for code in a checkpoint: loading it would need unpickling a class."""


def replay_error(capsys, checkpoint):
    assert replay.main([str(checkpoint), "--no-progress"]) == 2
    return capsys.readouterr().err


def test_checkpoints_it_cannot_replay(make_config, tmp_path, capsys):
    assert "no checkpoint file at" in replay_error(capsys, tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert "garbage.pth is not a RecBole checkpoint: torch.load failed" in replay_error(capsys, tmp_path / "garbage.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pth")
    assert ("is not a RecBole checkpoint: expected a dict with a RecBole 'config' and a 'state_dict', as "
            "RecBole's trainer saves; found ['weights']") in replay_error(capsys, tmp_path / "weights.pth")
    config = make_config("Mamba4Rec")
    refused = replay_error(capsys, write_checkpoint(tmp_path / "code.pth", config, payload=Payload()))
    assert "refusing to load this checkpoint: it references " in refused and "Payload" in refused

    sasrec = Config(model="SASRec", dataset="ml-100k", config_dict={"train_neg_sample_args": None})
    assert ("is a SASRec checkpoint; the replay streams Mamba2Rec and Mamba4Rec, which keep a fixed-size state "
            "per user") in replay_error(capsys, write_checkpoint(tmp_path / "sasrec.pth", sasrec))
    assert "is a Hydra4Rec checkpoint, which cannot stream: Hydra is bidirectional" in replay_error(
        capsys, write_checkpoint(tmp_path / "hydra.pth", make_config("Hydra4Rec")))
    config["model"] = "NoSuchModel"
    assert "unknown model 'NoSuchModel'" in replay_error(capsys, write_checkpoint(tmp_path / "unknown.pth", config))


def test_weights_that_do_not_fit(make_config, tmp_path, capsys):
    assert "weights do not fit the Mamba2Rec that its config builds" in replay_error(
        capsys, write_checkpoint(tmp_path / "no-weights.pth", make_config("Mamba2Rec")))


def test_test_items_must_be_the_last_events():
    items = np.array([5, 6, 7, 8, 9])
    by_user = replay.positions_by_user(np.array([1, 2, 1, 2, 1]))
    test_set = SimpleNamespace(uid_field="user", iid_field="item",
                               inter_feat={"user": torch.tensor([1, 2]), "item": torch.tensor([9, 8])})
    assert replay.test_positions(items, by_user, test_set).tolist() == [3, 4]
    test_set.inter_feat["item"] = torch.tensor([9, 6])
    with pytest.raises(replay.ReplayError, match="test items of user id 2 are not that user's last events"):
        replay.test_positions(items, by_user, test_set)
