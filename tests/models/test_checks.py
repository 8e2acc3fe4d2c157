"""Settings and datasets that a run of our models cannot use are refused before any work, with a
message naming the key, the value and what is allowed (recbole_ssm.models.checks)."""
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.quick_start import run_recbole
from recbole.utils import get_model

from recbole_ssm.models.checks import RunCheckError
from tests.conftest import MODELS, TINY

RUN_RECBOLE = os.path.join(os.path.dirname(sys.executable), "run_recbole")


def refused(model, **settings):
    """The message of the RunCheckError that building a Config on ml-100k raises."""
    with pytest.raises(RunCheckError) as error:
        Config(model=model, dataset="ml-100k", config_dict=settings)
    return str(error.value)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("settings,message", [
    ({"num_layers": 0}, "num_layers = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"num_layers": -1}, "num_layers = -1 (type int) is not allowed: expected an integer >= 1"),
    ({"num_layers": True}, "num_layers = True (type bool) is not allowed: expected an integer >= 1"),
    ({"hidden_size": 2.5}, "hidden_size = 2.5 (type float) is not allowed: expected an integer >= 1"),
    ({"d_state": 0}, "d_state = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"d_conv": 0}, "d_conv = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"expand": 0}, "expand = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"MAX_ITEM_LIST_LENGTH": 0},
     "MAX_ITEM_LIST_LENGTH = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"dropout_prob": 1.0}, "dropout_prob = 1.0 (type float) is not allowed: expected a number in [0, 1)"),
    ({"dropout_prob": "high"},
     "dropout_prob = 'high' (type str) is not allowed: expected a number in [0, 1)"),
    ({"loss_type": "MSE"}, "loss_type = 'MSE' is not allowed: expected one of CE, BPR"),
    ({"ssm_backend": "gpu"}, "ssm_backend = 'gpu' is not allowed: expected one of auto, torch, numba, cuda"),
])
def test_model_keys(model, settings, message):
    assert refused(model, **settings) == message


@pytest.mark.parametrize("model", ["Mamba2Rec", "Hydra4Rec"])
@pytest.mark.parametrize("settings,message", [
    ({"headdim": 0}, "headdim = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"ngroups": 0}, "ngroups = 0 (type int) is not allowed: expected an integer >= 1"),
    ({"chunk_size": -4}, "chunk_size = -4 (type int) is not allowed: expected an integer >= 1"),
    ({"headdim": 5}, "headdim = 5 is not allowed: it must divide expand * hidden_size = 2 * 64 = 128"),
    ({"ngroups": 3}, "ngroups = 3 is not allowed: it must divide the number of heads, "
                     "expand * hidden_size / headdim = 8"),
])
def test_ssd_model_keys(model, settings, message):
    assert refused(model, **settings) == message


def test_hydra_needs_an_odd_d_conv():
    assert refused("Hydra4Rec", d_conv=4) == (
        "d_conv = 4 is not allowed: Hydra4Rec's centred convolution needs an odd width")


@pytest.mark.parametrize("model", ["Mamba4Rec", "Mamba2Rec"])
def test_cuda_backend_needs_a_conv_width_its_kernel_has(model):
    assert refused(model, ssm_backend="cuda", d_conv=7) == (
        "d_conv = 7 is not allowed: with ssm_backend: cuda, causal-conv1d's kernel takes widths 2 to 4")


def test_cuda_backend_needs_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refused("Hydra4Rec", ssm_backend="cuda") == (
        "ssm_backend = 'cuda' is not allowed: PyTorch sees no CUDA device here; use auto or torch")


@pytest.mark.parametrize("key,value,allowed", [
    ("epochs", "abc", "expected an integer >= 1"),
    ("epochs", 0, "expected an integer >= 1"),
    ("train_batch_size", 0, "expected an integer >= 1"),
    ("eval_batch_size", 64.0, "expected an integer >= 1"),
    ("eval_step", -1, "expected an integer >= 0"),
    ("stopping_step", "ten", "expected an integer >= 0"),
    ("learning_rate", 0, "expected a number in (0, inf)"),
    ("learning_rate", "fast", "expected a number in (0, inf)"),
    ("weight_decay", -0.1, "expected a number in [0, inf)"),
])
def test_recbole_keys(key, value, allowed):
    message = refused("Mamba4Rec", **{key: value})
    assert message == f"{key} = {value!r} (type {type(value).__name__}) is not allowed: {allowed}"


@pytest.mark.parametrize("valid_metric", ["NDCG@20", "AUC", "ndcg@ten"])
def test_valid_metric_must_be_computed(valid_metric):
    assert refused("Mamba4Rec", valid_metric=valid_metric) == (
        f"valid_metric = {valid_metric!r} is not allowed: expected one of metrics (recall, mrr, ndcg, "
        "hit, precision), at a k of topk (10) for a ranking metric, e.g. recall@10")


def test_bpr_refuses_no_negatives():
    message = refused("Mamba4Rec", loss_type="BPR", train_neg_sample_args={"distribution": "none"})
    assert message == ("train_neg_sample_args.distribution = 'none' is not allowed: "
                       "expected one of uniform, popularity")


def test_model_checks_its_config_too(make_config, ml100k):
    """A Config changed after it was built is checked again when the model is built."""
    config = make_config("Mamba2Rec")
    config["d_state"] = 0
    with pytest.raises(RunCheckError, match=r"^d_state = 0 \(type int\) is not allowed"):
        get_model("Mamba2Rec")(config, ml100k[1]._dataset)


def test_ce_with_negative_sampling_refused():
    """RecBole's own check, which applies once our models leave input_type to loss_type: a CE batch
    with sampled negatives would score the negatives as targets."""
    with pytest.raises(ValueError, match="should be None when the loss_type is CE"):
        Config(model="Hydra4Rec", dataset="ml-100k",
               config_dict={"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}})


@pytest.mark.parametrize("option,named", [
    ("--num_layers=0", "num_layers = 0 (type int) is not allowed: expected an integer >= 1"),
    ("--epochs=abc", "epochs = 'abc' (type str) is not allowed: expected an integer >= 1"),
])
def test_cli_refuses_before_loading_data(tmp_path, option, named):
    result = subprocess.run([RUN_RECBOLE, "--model=Mamba4Rec", "--dataset=ml-100k", option],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"run_recbole: error: {named}"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "log").exists()  # refused before RecBole's logger, let alone the data


@pytest.mark.parametrize("model", ["Mamba4Rec", "SASRec"])  # config files are read for any model
@pytest.mark.parametrize("content,message", [
    (None, r"config file {path}: No such file or directory$"),
    ("- epochs\n- 3\n", r"config file {path} must hold 'key: value' lines, not a list$"),
    ("epochs: [1, 2\n", r"config file {path} is not valid YAML: while parsing a flow sequence\n"
                         r'  in "{path}", line 1'),
    (b"\xff: 1\n", r"config file {path} is not valid YAML: 'utf-8' codec can't decode byte 0xff"),
])
def test_bad_config_files(tmp_path, model, content, message):
    path = tmp_path / "settings.yaml"
    if content is not None:
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(RunCheckError, match="^" + message.format(path=re.escape(str(path)))):
        Config(model=model, dataset="ml-100k", config_file_list=[str(path)])


def test_empty_config_file_is_no_settings(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "later.yaml").write_text("d_state: 12\n")
    config = Config(model="Mamba4Rec", dataset="ml-100k",
                    config_file_list=[str(tmp_path / "later.yaml"), str(tmp_path / "empty.yaml")])
    assert config["d_state"] == 12


# ------------------------------------------------------------------- tiny datasets: splits, BPR


def write_inter(directory, name, interactions_per_user, users=6, items=12):
    """A tiny .inter file: each user rates the next ``interactions_per_user`` items in turn."""
    folder = directory / name
    folder.mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(users):
        lines += [f"u{user}\ti{(user + k) % items}\t{100 * user + k}" for k in range(interactions_per_user)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")


def tiny_run(tmp_path):
    """Settings for a dataset written by ``write_inter`` into tmp_path: every user and item kept."""
    return {**TINY, "data_path": str(tmp_path), "checkpoint_dir": str(tmp_path / "saved"),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)", "topk": [5],
            "valid_metric": "NDCG@5"}


def split(tmp_path, interactions_per_user, **settings):
    write_inter(tmp_path, "tiny", interactions_per_user)
    config = Config(model="Mamba4Rec", dataset="tiny", config_dict={**tiny_run(tmp_path), **settings})
    return data_preparation(config, create_dataset(config))


def test_nothing_to_train_on(tmp_path):
    with pytest.raises(RunCheckError, match=re.escape(
            "nothing to train on: the training split is empty (tiny has 6 users after filtering, "
            "with at most 1 interactions each; a user's sequence gives a training sample from 2 "
            "interactions on)")):
        split(tmp_path, 1)


def test_no_user_long_enough_for_a_test_item(tmp_path):
    with pytest.raises(RunCheckError, match=re.escape(
            "cannot evaluate: the test split is empty with eval_args split {'LS': 'valid_and_test'} "
            "(tiny has 6 users after filtering, with at most 2 interactions each; leave-one-out "
            "gives a user a test sample from 3 interactions on)")):
        split(tmp_path, 2)


def test_no_validation_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train, valid, test = split(tmp_path, 3)
    assert "the validation split is empty with eval_args split {'LS': 'valid_and_test'} (tiny has 6 " \
           "users after filtering, with at most 3 interactions each; leave-one-out gives a user a " \
           "valid sample from 4 interactions on): no early stopping" in caplog.text
    assert len(test.dataset) == 6


def test_no_test_asked_for_is_no_error(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        split(tmp_path, 3, eval_args={"split": {"LS": "valid_only"}, "order": "TO", "mode": "full"})
    assert "split is empty" not in caplog.text


def test_topk_above_the_number_of_items(tmp_path):
    with pytest.raises(RunCheckError, match=re.escape(
            "topk = [20] is not allowed: tiny has 9 items after filtering, and every k must be at "
            "most that")):
        split(tmp_path, 4, topk=[20], valid_metric="NDCG@20")


def test_bpr_alone_trains_with_a_default_negative(tmp_path, caplog):
    """--loss_type=BPR with the packaged train_neg_sample_args: ~ samples one uniform negative
    (it used to fail at the first batch with KeyError: 'neg_item_id')."""
    config = Config(model="Mamba4Rec", dataset="ml-100k", config_dict={"loss_type": "BPR"})
    assert config["train_neg_sample_args"]["distribution"] == "uniform"
    assert config["train_neg_sample_args"]["sample_num"] == 1
    assert config["MODEL_INPUT_TYPE"].name == "PAIRWISE"
    write_inter(tmp_path, "tiny", 8, users=30, items=20)
    with caplog.at_level(logging.INFO):
        result = run_recbole(model="Mamba4Rec", dataset="tiny", config_dict={
            **tiny_run(tmp_path), "loss_type": "BPR", "epochs": 1})
    assert "BPR loss: 1 uniform negative item(s) per positive" in caplog.text
    assert 0 <= result["test_result"]["ndcg@5"] <= result["test_result"]["hit@5"] <= 1
