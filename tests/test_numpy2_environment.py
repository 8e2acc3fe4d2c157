"""The NumPy 2 path on CPU too, in its own environment.

Our GPU image has Python 3.12, NumPy 2, a recent pandas and no ray (RecBole's ray pin has no
wheel there), with RecBole installed by ``pip install --no-deps recbole==1.2.1``. This test builds
the same state of the world in a fresh virtual environment on this Python: NumPy 2, the newest
pandas (3.x), RecBole without its dependencies, RecBole's other requirements as read from its
metadata, and our package; then it trains, saves, reloads and re-evaluates our models there, runs
the console script, and runs ``tests/test_compat_numpy2.py`` under real NumPy 2 and pandas 3.

It needs the package registry; it fails, with pip's output, when the environment cannot be built.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The torch of the environment running the tests (on CI: the local CPU wheel, not PyPI's CUDA one).
TORCH = f"torch=={torch.__version__}"
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    "dataset", "saved", "log", "log_tensorboard", ".whl")
TINY = {
    "hidden_size": 16, "d_state": 8, "MAX_ITEM_LIST_LENGTH": 20, "epochs": 1,
    "train_batch_size": 1024, "eval_batch_size": 4096, "show_progress": False,
    # ml-100k's users with fewer than 30 ratings (199 of 943): one epoch takes seconds on 2 cores
    "user_inter_num_interval": "[0,30)",
}
COMMAND_TIMEOUT = 600

CHECKS = textwrap.dedent('''
    """Runs inside the NumPy 2 environment; prints one JSON line of results at the end."""
    import glob, json, math, os, sys

    import numpy as np
    import pandas as pd

    assert int(np.__version__.split(".")[0]) == 2, f"NumPy {np.__version__}, not 2"
    assert int(pd.__version__.split(".")[0]) >= 3, f"pandas {pd.__version__}, not 3"
    try:
        import ray  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("ray is installed in the NumPy 2 environment")

    import recbole_ssm
    assert recbole_ssm.__file__.startswith(sys.prefix), recbole_ssm.__file__  # installed copy
    from recbole.quick_start import load_data_and_model, run_recbole
    from recbole.quick_start import quick_start
    from recbole.utils import get_trainer

    try:
        quick_start.tune.report(ndcg=0.0)
    except ImportError as error:
        assert "hyper-parameter tuning" in str(error), error
    else:
        raise AssertionError("ray's tune.report did not fail without ray")

    config = json.loads(sys.argv.pop(1))  # off argv, where RecBole looks for --key=value
    results = {"numpy": np.__version__, "pandas": pd.__version__}
    for model in ("Mamba4Rec", "Hydra4Rec"):
        checkpoint_dir = os.path.abspath(f"saved-{model}")
        result = run_recbole(model=model, dataset="ml-100k", saved=True,
                             config_dict=dict(config, checkpoint_dir=checkpoint_dir))
        test_result = {key: float(value) for key, value in result["test_result"].items()}
        assert test_result and all(map(math.isfinite, test_result.values())), test_result

        (saved_file,) = glob.glob(os.path.join(checkpoint_dir, f"{model}-*.pth"))
        config_, model_, _, _, _, test_data = load_data_and_model(saved_file)
        assert type(model_).__name__ == model
        trainer = get_trainer(config_["MODEL_TYPE"], config_["model"])(config_, model_)
        reloaded = trainer.evaluate(test_data, load_best_model=False)
        results[model] = {"test": test_result,
                          "reloaded": {key: float(value) for key, value in reloaded.items()}}
    print("RESULTS " + json.dumps(results))
''')


def _environment():
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(command, what, cwd):
    """Run a command; on failure (or timeout) fail the test with its output."""
    try:
        process = subprocess.run(command, cwd=cwd, env=_environment(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        output = error.output or ""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        pytest.fail(f"{what}: timed out after {COMMAND_TIMEOUT} s: {' '.join(command)}\n"
                    f"{output[-8000:]}", pytrace=False)
    if process.returncode != 0:
        pytest.fail(f"{what}: exit status {process.returncode}: {' '.join(command)}\n"
                    f"{process.stdout[-8000:]}", pytrace=False)
    return process.stdout


def _recbole_requirements(python, cwd):
    """RecBole's requirements as its installed metadata lists them, less ray and the extras."""
    read = ("import importlib.metadata, json; "
            "print(json.dumps(importlib.metadata.requires('recbole')))")
    requirements = []
    for line in json.loads(_run([python, "-c", read], "reading RecBole's requirements", cwd)):
        requirement = Requirement(line)
        if requirement.name.lower() == "ray" or (
                requirement.marker is not None and "extra" in str(requirement.marker)):
            continue
        requirements.append(str(requirement))
    if not any(r.startswith("pandas") for r in requirements):
        pytest.fail(f"RecBole's metadata lists no pandas requirement: {requirements}",
                    pytrace=False)
    return requirements


@pytest.fixture(scope="module")
def numpy2_env(tmp_path_factory):
    """A fresh virtual environment: NumPy 2, pandas 3, RecBole 1.2.1 without ray, our package.

    When it cannot be built, each test fails with the reason (see :func:`_ready`).
    """
    try:
        return _build_environment(tmp_path_factory.mktemp("numpy2-env"))
    except (pytest.fail.Exception, Exception) as error:
        return error


def _ready(numpy2_env):
    if isinstance(numpy2_env, pytest.fail.Exception):
        pytest.fail(str(numpy2_env), pytrace=False)
    if isinstance(numpy2_env, BaseException):
        pytest.fail(f"building the NumPy 2 environment: {type(numpy2_env).__name__}: {numpy2_env}")
    return numpy2_env


def _build_environment(root):
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], "creating the virtual environment", root)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-compile"]

    _run(pip + ["--no-deps", "recbole==1.2.1"], "installing RecBole without its dependencies", root)
    requirements = _recbole_requirements(python, root)
    # pip reports RecBole's missing ray as a conflict here (exit status 0): that is the point.
    _run(pip + [TORCH, "numpy>=2", "pandas", "pytest", *requirements],
         "installing NumPy 2, pandas and RecBole's requirements", root)
    source = root / "recbole-ssm"  # a copy: pip builds a local project in its directory
    shutil.copytree(REPO_ROOT, source, ignore=NOT_COPIED)
    _run(pip + ["--no-deps", str(source)], "installing recbole-ssm", root)

    work = root / "work"
    work.mkdir()
    return {"python": python, "bin": venv / "bin", "work": work}


def test_train_save_reload_evaluate(numpy2_env):
    numpy2_env = _ready(numpy2_env)
    script = numpy2_env["work"] / "checks.py"
    script.write_text(CHECKS)
    output = _run([numpy2_env["python"], str(script), json.dumps(TINY)],
                  "training and reloading in the NumPy 2 environment", numpy2_env["work"])
    lines = [line for line in output.splitlines() if line.startswith("RESULTS ")]
    assert lines, output[-8000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    assert results["numpy"].startswith("2.")
    for model in ("Mamba4Rec", "Hydra4Rec"):
        test, reloaded = results[model]["test"], results[model]["reloaded"]
        assert reloaded["ndcg@10"] == pytest.approx(test["ndcg@10"], abs=1e-4), (model, results)


def test_console_script(numpy2_env):
    numpy2_env = _ready(numpy2_env)
    overrides = [f"--{key}={value}" for key, value in TINY.items()]
    output = _run([str(numpy2_env["bin"] / "run_recbole"), "--model=Mamba2Rec", "--dataset=ml-100k",
                   f"--checkpoint_dir={numpy2_env['work'] / 'saved-cli'}", *overrides],
                  "run_recbole in the NumPy 2 environment", numpy2_env["work"])
    assert "test result" in output, output[-8000:]


def test_compat_unit_tests(numpy2_env):
    """tests/test_compat_numpy2.py under real NumPy 2 and pandas 3, on the installed copy."""
    numpy2_env = _ready(numpy2_env)
    _run([numpy2_env["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider",
          os.path.join(REPO_ROOT, "tests", "test_compat_numpy2.py")],
         "tests/test_compat_numpy2.py in the NumPy 2 environment", numpy2_env["work"])
