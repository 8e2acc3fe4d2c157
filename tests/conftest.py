"""Shared fixtures: tiny RecBole configurations and one real ml-100k load per test session."""
import os
import re

import pytest
import torch

import recbole_ssm  # noqa: F401  (registers our models and applies the compat fixes)
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole_ssm.ops.backend import BACKENDS

MODELS = ("Mamba4Rec", "Mamba2Rec", "Hydra4Rec")
CPU_BACKENDS = tuple(backend for backend in BACKENDS if backend != "cuda")

# One intra-op thread, here and in the subprocesses the tests start: the tiny models gain nothing from
# a second thread, and when the cores are shared with anything else, OpenMP's spinning threads make
# every training run about 8x slower (measured: 194 s instead of 24 s for one epoch of Mamba2Rec).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Small enough for a 2-core CPU: a training epoch on ml-100k in seconds.
TINY = {
    "hidden_size": 16,
    "d_state": 8,
    "headdim": 8,
    "MAX_ITEM_LIST_LENGTH": 20,
    "train_batch_size": 1024,
    "eval_batch_size": 4096,
    "show_progress": False,
    "seed": 2024,
}


def logged_test_result(output):
    """{metric: value} of the "test result" line that RecBole logs: ``test result:
    OrderedDict([('hit@10', 0.05), ...])``, ``OrderedDict({'hit@10': 0.05, ...})`` from Python 3.12
    on, and ``np.float64(0.05)`` for 0.05 with NumPy 2."""
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # colour codes, where RecBole writes them
    line = re.search(r"test result: OrderedDict\((.*)\)", output)
    assert line, f"no test result in the output:\n{output[-3000:]}"
    pairs = re.findall(r"'([^']+)'(?:, |: )(?:np\.float64\()?([-+.\deE]+)", line.group(1))
    return {metric: float(value) for metric, value in pairs}


@pytest.fixture(scope="session", autouse=True)
def session_working_folder(tmp_path_factory):
    """RecBole writes log/, log_tensorboard/ and saved/ into the working directory: fixtures shared by
    several tests run in a folder of the session's, so nothing is written into the repository."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("work"))
        yield


@pytest.fixture(autouse=True)
def working_folder(tmp_path, monkeypatch):
    """Each test runs in its own folder (its tmp_path), for the same reason."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory):
    """TINY plus a checkpoint directory of this session's own."""
    return {**TINY, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}


@pytest.fixture(scope="session")
def make_config(tiny_settings):
    """make_config(model, **overrides) -> a RecBole Config on ml-100k with the tiny settings."""

    def make(model, **overrides):
        return Config(model=model, dataset="ml-100k", config_dict={**tiny_settings, **overrides})

    return make


@pytest.fixture(scope="session")
def ml100k(make_config):
    """(dataset, train_data, valid_data, test_data) of RecBole's bundled ml-100k, split once."""
    config = make_config("Mamba4Rec")
    dataset = create_dataset(config)
    return (dataset, *data_preparation(config, dataset))
