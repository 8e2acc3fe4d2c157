"""Shared fixtures: tiny RecBole configurations and one real ml-100k load per test session; helpers
for runs of the run_recbole console script."""
import copy
import os
import re
import sys

import pytest
import torch

import recbole_ssm  # noqa: F401  (registers our models and applies the compat fixes)
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.quick_start import load_data_and_model
from recbole.utils import get_model, get_trainer

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

RUN_RECBOLE = os.path.join(os.path.dirname(sys.executable), "run_recbole")


def logged_result(output, label="test result"):
    """{metric: value} of the metrics RecBole logged as ``label: ...`` ("test result", "best valid"):
    ``OrderedDict([('hit@10', 0.05), ...])``, ``OrderedDict({'hit@10': 0.05, ...})`` from Python 3.12
    on, and ``np.float64(0.05)`` for 0.05 with NumPy 2."""
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # colour codes, where RecBole writes them
    line = re.search(rf"{label}\s*: (.*)", output)
    assert line, f"no {label!r} in the output:\n{output[-3000:]}"
    pairs = re.findall(r"'([^']+)'(?:, |: )(?:np\.float64\()?([-+.\deE]+)", line.group(1))
    assert pairs, f"no metrics in {line.group(0)!r}"
    return {metric: float(value) for metric, value in pairs}


def evaluate_checkpoint(checkpoint):
    """(dataset, valid result, test result) of a RecBole checkpoint, reloaded and evaluated here."""
    config, model, dataset, _, valid_data, test_data = load_data_and_model(checkpoint)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    valid_result, test_result = (trainer.evaluate(data, load_best_model=False, show_progress=False)
                                 for data in (valid_data, test_data))
    return dataset, valid_result, test_result


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


@pytest.fixture
def record_calls(monkeypatch):
    """``record_calls(module, name)``: from then on, ``module.name`` still runs and the list returned
    gets each call's positional arguments."""
    def install(module, name):
        calls, original = [], getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)
        return calls
    return install


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


@pytest.fixture(scope="session")
def build_model(make_config, ml100k):
    """build_model(model, **overrides) -> one of our models on ml-100k, tiny, seeded weights."""

    def build(model, **overrides):
        torch.manual_seed(0)
        return get_model(model)(make_config(model, **overrides), ml100k[1]._dataset)

    return build


@pytest.fixture(scope="session")
def ml100k_histories(ml100k):
    """Real ml-100k histories, right-padded, one per length from 1 (shorter than the convolution's
    window) to MAX_ITEM_LIST_LENGTH: (item_seq (users, length), item_seq_len (users,))."""
    config = ml100k[0].config
    batch = next(iter(ml100k[1]))
    item_seq = batch[config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]]
    item_seq_len = batch[config["ITEM_LIST_LENGTH_FIELD"]]
    rows = [int((item_seq_len == length).nonzero()[0]) for length in item_seq_len.unique().tolist()]
    assert len(rows) == item_seq.shape[1] == config["MAX_ITEM_LIST_LENGTH"]  # every length occurs
    return item_seq[rows], item_seq_len[rows]


def with_backend(module, backend):
    """A copy of ``module`` (a block or a model) whose blocks and norms use ``backend``."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return module
