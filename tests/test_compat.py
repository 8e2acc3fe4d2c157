"""The RecBole 1.2.1 compatibility fixes of recbole_ssm.compat."""
import functools
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from recbole.quick_start import load_data_and_model
from recbole.utils import get_model, get_trainer

from recbole_ssm import compat


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_numpy_aliases_added_only_where_missing(monkeypatch):
    monkeypatch.delattr(np, "float", raising=False)
    monkeypatch.setattr(np, "str", "kept", raising=False)
    compat.set_numpy_aliases()
    assert np.float is np.float64  # the type RecBole's own settings assigned (np.float_)
    assert np.str == "kept"        # an attribute NumPy (or anyone) already has is left alone


# setup.cfg: below Python 3.12 RecBole is a dependency, and with it ray 2.6.3; from 3.12 on (ray 2.6.3
# has no wheel) RecBole is installed with --no-deps (README, "Python 3.12"), and there is no ray.
RAY_INSTALLED = sys.version_info < (3, 12)
# Script lines that use ray through RecBole's tuning, and what they print when that is refused.
TRY_TUNING = (
    "from recbole.quick_start import quick_start\n"
    "try:\n"
    "    quick_start.tune.report(ndcg=0.1)\n"
    "except ImportError as error:\n"
    "    print('refused:', error)\n")
TUNING_REFUSED = "refused: ray.tune is needed only for RecBole's hyper-parameter tuning"


def test_ray_as_installed_for_this_python():
    """Where ray 2.6.3 is installed, its imports work (setuptools<81, numpy<2) and stay real; where it
    is not (Python >= 3.12), it is really absent and only tuning fails."""
    if RAY_INSTALLED:
        result = run_python(
            "import recbole_ssm, ray, pkg_resources\n"
            "from recbole.quick_start import quick_start\n"
            "assert quick_start.tune.__name__ == 'ray.tune', quick_start.tune\n"
            "print(ray.__version__)\n")
        assert result.returncode == 0, result.stderr
        assert "pkg_resources is deprecated" not in result.stderr
    else:
        result = run_python(
            "import importlib.util\n"
            "assert importlib.util.find_spec('ray') is None, 'ray is installed'\n"
            "import recbole_ssm\n" + TRY_TUNING)
        assert result.returncode == 0, result.stderr
        assert TUNING_REFUSED in result.stdout


def test_quick_start_without_ray():
    """Without ray, recbole.quick_start imports, and only tuning fails, with a clear message."""
    result = run_python(
        "import sys\n"
        "sys.modules['ray'] = None  # as if ray were not installed\n"
        "import recbole_ssm\n"
        "from recbole.quick_start import run_recbole, load_data_and_model\n"
        "assert 'ray' not in sys.modules  # the stand-in is gone once RecBole is imported\n"
        + TRY_TUNING)
    assert result.returncode == 0, result.stderr
    assert TUNING_REFUSED in result.stdout


@pytest.fixture(scope="module")
def trainer_and_checkpoint(make_config, ml100k):
    """A RecBole trainer of an untrained Mamba4Rec and the checkpoint file RecBole writes for it."""
    config = make_config("Mamba4Rec", metric_decimal_place=10)  # RecBole rounds metrics to 4 places
    model = get_model("Mamba4Rec")(config, ml100k[1]._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer._save_checkpoint(0, verbose=False)
    return trainer, trainer.saved_model_file


def test_torch_refuses_recbole_checkpoints_by_default(trainer_and_checkpoint):
    """The problem being fixed, and proof that weights_only stays on for plain torch.load."""
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(trainer_and_checkpoint[1])


def test_recbole_checkpoints_load(trainer_and_checkpoint, ml100k):
    trainer, checkpoint_file = trainer_and_checkpoint
    checkpoint = compat.load_checkpoint(checkpoint_file)
    assert checkpoint["config"]["model"] == "Mamba4Rec"
    assert set(checkpoint["state_dict"]) == set(trainer.model.state_dict())
    trainer.resume_checkpoint(checkpoint_file)
    assert trainer.start_epoch == 1
    expected = trainer.evaluate(ml100k[3], load_best_model=False)  # with the checkpointed weights
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter))  # weights that only the checkpoint can restore
    assert trainer.evaluate(ml100k[3], load_best_model=False)["ndcg@10"] != pytest.approx(expected["ndcg@10"])
    result = trainer.evaluate(ml100k[3], load_best_model=True, model_file=checkpoint_file)
    assert dict(result) == pytest.approx(dict(expected), rel=0, abs=1e-9)
    for name, tensor in checkpoint["state_dict"].items():
        torch.testing.assert_close(trainer.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_load_data_and_model(trainer_and_checkpoint):
    trainer, checkpoint_file = trainer_and_checkpoint
    original_load = torch.load
    config, model, *_ = load_data_and_model(checkpoint_file)
    assert torch.load is original_load  # the allow-list applied only inside RecBole's call
    assert type(model) is type(trainer.model)
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)


class RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsRecBoleFunction:
    """Unpickling this calls a function from an allowed module that is not a checkpoint type."""

    def __reduce__(self):
        from recbole.model.init import xavier_normal_initialization

        return xavier_normal_initialization, (None,)


@pytest.mark.parametrize("protocol", [2, 4])  # torch.save's default, RecBole's
@pytest.mark.parametrize("payload,named", [
    (lambda marker: RunsCommand(f"touch {marker}"), "system"),
    (lambda marker: CallsRecBoleFunction(), "recbole.model.init.xavier_normal_initialization"),
])
def test_crafted_checkpoint_refused(tmp_path, trainer_and_checkpoint, ml100k, payload, named, protocol):
    trainer, checkpoint_file = trainer_and_checkpoint
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pth"
    checkpoint = compat.load_checkpoint(checkpoint_file)
    checkpoint["other_parameter"] = payload(marker)
    torch.save(checkpoint, crafted, pickle_protocol=protocol)
    original_load = torch.load
    evaluate_best = functools.partial(trainer.evaluate, ml100k[3], True)  # load_best_model=True, model_file
    for load in (compat.load_checkpoint, load_data_and_model, trainer.resume_checkpoint, evaluate_best):
        with pytest.raises(compat.UnsafeCheckpointError, match=f"references .*{named}"):
            load(str(crafted))
    assert not marker.exists()
    assert torch.load is original_load


def test_recbole_models_leave_autograd_anomaly_mode_off():
    """RecBole's sine.py turns on anomaly detection for the whole process when its sequential models
    are imported; after ``import recbole_ssm`` the mode stays as it was, off or on."""
    result = run_python(
        "import torch\n"
        "import recbole_ssm\n"
        "from recbole.utils import get_model\n"
        "import recbole.model.sequential_recommender.sine\n"
        "get_model('SASRec')\n"
        "assert not torch.is_anomaly_enabled()\n")
    assert result.returncode == 0, result.stderr
    result = run_python(
        "import torch\n"
        "torch.autograd.set_detect_anomaly(True)\n"
        "import recbole_ssm\n"
        "assert torch.is_anomaly_enabled()\n")
    assert result.returncode == 0, result.stderr


def pickle_globals(checkpoint_file):
    """The ``module.name`` globals that the pickle inside a torch zip checkpoint references."""
    with zipfile.ZipFile(checkpoint_file) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            found.add(argument.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        if isinstance(argument, str):
            strings.append(argument)
    return found


def test_checkpoint_saved_again_by_plain_torch_save_loads(tmp_path, trainer_and_checkpoint):
    """torch.save's default protocol 2 pickles bytes through _codecs.encode, which torch's own
    weights_only loader accepts; so does ours."""
    trainer, checkpoint_file = trainer_and_checkpoint
    again = tmp_path / "again.pth"
    checkpoint = compat.load_checkpoint(checkpoint_file)
    checkpoint["best_valid_score"] = np.float64(0.1234)  # as after a validation: a NumPy scalar
    torch.save(checkpoint, again)
    assert "_codecs.encode" in pickle_globals(again)  # the scalar's bytes
    config, model, *_ = load_data_and_model(str(again))
    assert compat.load_checkpoint(again)["best_valid_score"] == np.float64(0.1234)
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)


@dataclass
class Scale:
    """A user type that torch.serialization.add_safe_globals can mark as safe."""

    factor: float


def test_globals_marked_safe_for_torch_are_accepted(tmp_path, trainer_and_checkpoint):
    _, checkpoint_file = trainer_and_checkpoint
    saved = tmp_path / "with_scale.pth"
    checkpoint = compat.load_checkpoint(checkpoint_file)
    checkpoint["other_parameter"] = Scale(0.5)
    torch.save(checkpoint, saved)
    with pytest.raises(compat.UnsafeCheckpointError, match=rf"references {Scale.__module__}\.Scale,"):
        compat.load_checkpoint(saved)
    with torch.serialization.safe_globals([Scale]):
        assert compat.load_checkpoint(saved)["other_parameter"] == Scale(0.5)


def cut_in_half(data):
    return data[: len(data) // 2]


def flip_a_weight_byte(data):
    """One bit of the largest entry (the item embeddings) changed: it no longer matches its CRC-32."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    header = entry.header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26:header + 30])
    damaged = bytearray(data)
    damaged[header + 30 + name_length + extra_length] ^= 0x01  # the entry's first data byte
    return bytes(damaged)


@pytest.mark.parametrize("damage,reason", [
    (lambda data: b"", "the file is empty"),
    (cut_in_half, "its zip archive is cut short or damaged"),
    (flip_a_weight_byte, r"its entry .*/data/\d+ is damaged \(CRC-32 mismatch\)"),
    (lambda data: b"not a checkpoint at all", "its data breaks off or is damaged"),
])
def test_incomplete_checkpoint_named(tmp_path, trainer_and_checkpoint, damage, reason):
    trainer, checkpoint_file = trainer_and_checkpoint
    broken = tmp_path / "broken.pth"
    with open(checkpoint_file, "rb") as handle:
        broken.write_bytes(damage(handle.read()))
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    for load in (compat.load_checkpoint, load_data_and_model, trainer.resume_checkpoint):
        with pytest.raises(compat.IncompleteCheckpointError,
                           match=f"^{broken} is not a complete checkpoint: {reason}"):
            load(str(broken))
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_legacy_format_cut_short(tmp_path):
    """torch.save's format before the zip archive (``_use_new_zipfile_serialization=False``)."""
    legacy = tmp_path / "legacy.pth"
    torch.save({"weight": torch.ones(100)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(cut_in_half(legacy.read_bytes()))
    with pytest.raises(compat.IncompleteCheckpointError,
                       match=f"^{legacy} is not a complete checkpoint: its data breaks off"):
        compat.load_checkpoint(legacy)
