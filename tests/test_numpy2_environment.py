"""The NumPy 2 path on the installed copy of recbole-ssm, in an environment without ray.

Our GPU image has Python 3.12, NumPy 2, pandas 3 and no ray (RecBole's ray pin has no wheel there),
with RecBole installed by ``pip install --no-deps recbole==1.2.1``. These tests run in such an
environment, with recbole-ssm installed (not editable), and from a folder outside the source tree,
so that ``import recbole_ssm`` finds the installed copy (asserted every time):

- when the Python running the tests is such an environment (``.ci/run``'s Python 3.12 stage
  installs one), they use it, after checking that its copy of recbole-ssm is this source tree's;
- otherwise they build one in a fresh virtual environment on this Python: NumPy 2, the newest pandas
  (3.x), RecBole without its dependencies, RecBole's other requirements as read from its metadata,
  and our package (minutes; it needs the package registry, and fails with pip's output without it).

There they train, save, reload and re-evaluate our models, run the console script and reload what
it saved, and run ``tests/test_compat_numpy2.py`` under real NumPy 2 and pandas 3.
"""
import filecmp
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from packaging.requirements import Requirement

from tests.conftest import logged_result

pytestmark = pytest.mark.slow_env

REPO_ROOT = Path(__file__).resolve().parents[1]
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
PYTHON_312 = {"python_version": "3.12", "extra": ""}  # the environment markers of a 3.12 install

# What every script run in the environment checks first.
ENVIRONMENT_CHECKS = textwrap.dedent('''
    import json, os, sys

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
    assert recbole_ssm.__file__.startswith(sys.prefix), recbole_ssm.__file__  # the installed copy
''')

TRAIN = ENVIRONMENT_CHECKS + textwrap.dedent('''
    from recbole.quick_start import run_recbole
    from recbole.quick_start import quick_start

    try:
        quick_start.tune.report(ndcg=0.0)
    except ImportError as error:
        assert "hyper-parameter tuning" in str(error), error
    else:
        raise AssertionError("ray's tune.report did not fail without ray")

    config = json.loads(sys.argv.pop(1))  # off argv, where RecBole looks for --key=value
    results = {"numpy": np.__version__, "pandas": pd.__version__}
    for model in ("Mamba4Rec", "Hydra4Rec"):
        result = run_recbole(model=model, dataset="ml-100k", saved=True,
                             config_dict=dict(config, checkpoint_dir=os.path.abspath(f"saved-{model}")))
        results[model] = {key: float(value) for key, value in result["test_result"].items()}
    print("RESULTS " + json.dumps(results))
''')

# Reloads each checkpoint named on the command line and evaluates it on its test set.
RELOAD = ENVIRONMENT_CHECKS + textwrap.dedent('''
    from recbole.quick_start import load_data_and_model
    from recbole.utils import get_trainer

    results = {}
    for checkpoint in sys.argv[1:]:
        config, model, _, _, _, test_data = load_data_and_model(checkpoint)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        result = trainer.evaluate(test_data, load_best_model=False)
        results[type(model).__name__] = {key: float(value) for key, value in result.items()}
    print("RESULTS " + json.dumps(results))
''')

# Reports which recbole_ssm the pytest run in the environment imports.
COMPAT_CONFTEST = textwrap.dedent('''
    import recbole_ssm


    def pytest_report_header():
        return f"recbole_ssm imported from {recbole_ssm.__file__}"
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


def _run_script(environment, name, script, *args, what):
    """Run ``script`` with the environment's Python in its work folder; returns its RESULTS line."""
    path = environment["work"] / name
    path.write_text(script)
    output = _run([environment["python"], str(path), *args], what, environment["work"])
    lines = [line for line in output.splitlines() if line.startswith("RESULTS ")]
    assert lines, output[-8000:]
    return json.loads(lines[-1][len("RESULTS "):])


def _requirements(python, distribution, cwd):
    """The requirements of the installed ``distribution`` as its metadata lists them for Python 3.12,
    whatever this Python is, less ray and the extras."""
    read = ("import importlib.metadata, json; "
            f"print(json.dumps(importlib.metadata.requires({distribution!r})))")
    requirements = []
    for line in json.loads(_run([python, "-c", read], f"reading {distribution}'s requirements", cwd)):
        requirement = Requirement(line)
        if requirement.name.lower() == "ray" or (requirement.marker is not None and not
                                                 requirement.marker.evaluate(PYTHON_312)):
            continue
        requirement.marker = None
        requirements.append(str(requirement))
    if not any(r.startswith("pandas") for r in requirements):
        pytest.fail(f"{distribution}'s metadata lists no pandas requirement: {requirements}",
                    pytrace=False)
    return requirements


def _installed_copy():
    """The folder of recbole_ssm as installed (not editable) in this Python's site-packages, or None.
    (Not found through sys.path, where the source tree's own recbole_ssm.egg-info may come first.)"""
    site_packages = sysconfig.get_path("purelib")
    distribution = next(importlib.metadata.distributions(name="recbole-ssm", path=[site_packages]), None)
    files = (distribution.files or []) if distribution else []
    init = next((f for f in files if f.as_posix() == "recbole_ssm/__init__.py"), None)
    return None if init is None else Path(init.locate()).resolve().parent


def _is_numpy2_environment():
    """Whether this Python is a NumPy 2 / pandas 3 environment without ray, with recbole-ssm installed."""
    return (int(np.__version__.split(".")[0]) == 2 and int(pd.__version__.split(".")[0]) >= 3
            and importlib.util.find_spec("ray") is None and _installed_copy() is not None)


def _differences(installed, source):
    """Our package's files (.py, .yaml) that the ``installed`` copy lacks or has with other contents."""
    different = []
    for path in sorted([*source.rglob("*.py"), *source.rglob("*.yaml")]):
        copy = installed / path.relative_to(source)
        if not copy.is_file() or not filecmp.cmp(path, copy, shallow=False):
            different.append(str(path.relative_to(source)))
    return different


def _this_environment(root):
    installed = _installed_copy()
    stale = _differences(installed, REPO_ROOT / "recbole_ssm")
    if stale:
        pytest.fail(f"this NumPy 2 environment's recbole-ssm ({installed}) is not this source tree's: "
                    f"{', '.join(stale)} differ. Reinstall it with 'pip install .'.", pytrace=False)
    work = root / "work"
    work.mkdir()
    return {"python": sys.executable, "bin": Path(sys.executable).parent, "prefix": sys.prefix, "work": work}


def _build_environment(root):
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], "creating the virtual environment", root)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-compile"]

    _run(pip + ["--no-deps", "recbole==1.2.1"], "installing RecBole without its dependencies", root)
    source = root / "recbole-ssm"  # a copy: pip builds a local project in its directory
    shutil.copytree(REPO_ROOT, source, ignore=NOT_COPIED)
    _run(pip + ["--no-deps", str(source)], "installing recbole-ssm without its dependencies", root)
    requirements = _requirements(python, "recbole", root) + _requirements(python, "recbole-ssm", root)
    # pip reports RecBole's missing ray as a conflict here (exit status 0): that is the point.
    _run(pip + [TORCH, "numpy>=2", "pandas>=3", "pytest", *requirements],
         "installing NumPy 2, pandas 3 and the requirements of RecBole and recbole-ssm", root)

    work = root / "work"
    work.mkdir()
    return {"python": python, "bin": venv / "bin", "prefix": str(venv), "work": work}


@pytest.fixture(scope="module")
def numpy2_env(tmp_path_factory):
    """This Python when it is a NumPy 2 environment with recbole-ssm installed, else a new one.

    When it cannot be built, each test fails with the reason (see :func:`_ready`).
    """
    root = tmp_path_factory.mktemp("numpy2-env")
    try:
        return _this_environment(root) if _is_numpy2_environment() else _build_environment(root)
    except (pytest.fail.Exception, Exception) as error:
        return error


def _ready(numpy2_env):
    if isinstance(numpy2_env, pytest.fail.Exception):
        pytest.fail(str(numpy2_env), pytrace=False)
    if isinstance(numpy2_env, BaseException):
        pytest.fail(f"building the NumPy 2 environment: {type(numpy2_env).__name__}: {numpy2_env}")
    return numpy2_env


def assert_reload_reproduces(environment, tested, checkpoints):
    """Reloading ``checkpoints`` in the environment reproduces the test results ``tested``
    ({model: metrics}), which are finite, in [0, 1], and ordered as their definitions imply."""
    reloaded = _run_script(environment, "reload.py", RELOAD, *map(str, checkpoints),
                           what="reloading in the NumPy 2 environment")
    assert set(reloaded) == set(tested)
    for model, metrics in tested.items():
        assert 0 < metrics["mrr@10"] <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1, (model, metrics)
        for key, value in metrics.items():
            assert reloaded[model][key] == pytest.approx(value, abs=1e-4), (model, key, reloaded)


def test_train_save_reload_evaluate(numpy2_env):
    environment = _ready(numpy2_env)
    results = _run_script(environment, "train.py", TRAIN, json.dumps(TINY),
                          what="training in the NumPy 2 environment")
    assert results["numpy"].startswith("2.") and int(results["pandas"].split(".")[0]) >= 3
    checkpoints = [path for model in ("Mamba4Rec", "Hydra4Rec")
                   for path in (environment["work"] / f"saved-{model}").glob(f"{model}-*.pth")]
    assert_reload_reproduces(environment, {model: results[model] for model in ("Mamba4Rec", "Hydra4Rec")},
                             checkpoints)


def test_console_script(numpy2_env):
    environment = _ready(numpy2_env)
    saved = environment["work"] / "saved-cli"
    overrides = [f"--{key}={value}" for key, value in TINY.items()]
    output = _run([str(environment["bin"] / "run_recbole"), "--model=Mamba2Rec", "--dataset=ml-100k",
                   f"--checkpoint_dir={saved}", *overrides],
                  "run_recbole in the NumPy 2 environment", environment["work"])
    assert_reload_reproduces(environment, {"Mamba2Rec": logged_result(output)},
                             list(saved.glob("Mamba2Rec-*.pth")))


def test_compat_unit_tests(numpy2_env):
    """tests/test_compat_numpy2.py under real NumPy 2 and pandas 3, on the installed copy: run from a
    folder of its own, with no configuration that would put the source tree on sys.path."""
    environment = _ready(numpy2_env)
    folder = environment["work"] / "compat-tests"
    folder.mkdir()
    shutil.copy(REPO_ROOT / "tests" / "test_compat_numpy2.py", folder)
    (folder / "conftest.py").write_text(COMPAT_CONFTEST)
    (folder / "pytest.ini").write_text("[pytest]\n")
    output = _run([environment["python"], "-m", "pytest", "-p", "no:cacheprovider", str(folder)],
                  "tests/test_compat_numpy2.py in the NumPy 2 environment", folder)
    imported = re.search(r"^recbole_ssm imported from (.*)$", output, re.MULTILINE)
    assert imported, output[-8000:]
    assert imported.group(1).startswith(environment["prefix"]), f"{imported.group(1)} is not the installed copy"
    assert re.search(r"\b\d+ passed\b", output) and " failed" not in output, output[-8000:]
