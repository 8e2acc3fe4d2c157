"""Makes RecBole find our models by name, with their default hyper-parameters.

RecBole's ``get_model(name)`` looks for a module ``recbole.model.<kind>_recommender.<name.lower()>``.
Each of our model modules is registered in ``sys.modules`` under that name, so RecBole's own lookup
(from ``Config``, ``run_recbole``, ``load_data_and_model``, ...) returns our class. RecBole reads a
model's defaults from ``recbole/properties/model/<Model>.yaml`` right after ``overall.yaml``; our
defaults, packaged in ``recbole_ssm/properties/<Model>.yaml``, are read at that same point, so config
files, config dicts and the command line override them in RecBole's usual order.

For our models, two checks of :mod:`recbole_ssm.models.checks` run inside RecBole: the settings, once
``Config`` has merged them and before it completes them (so before any data is loaded), and the
evaluation splits, right after ``SequentialDataset.build`` made them (before training). For every
model, ``Config`` reads config files with ``checks.read_config_files``: a missing, invalid or empty
file gets a one-line error (or, empty, no settings) instead of a traceback from deep inside RecBole.
"""
import functools
import importlib
import os
import sys

import numpy as np

MODEL_MODULES = {
    "Mamba4Rec": "recbole_ssm.models.mamba4rec",
    "Mamba2Rec": "recbole_ssm.models.mamba2rec",
    "Hydra4Rec": "recbole_ssm.models.hydra4rec",
}
_PROPERTIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")


def model_names():
    """Our model names, sorted."""
    return sorted(MODEL_MODULES)


def default_config_file(model):
    """Path of the packaged default YAML of one of our models, or None for any other model."""
    if model not in MODEL_MODULES:
        return None
    return os.path.join(_PROPERTIES, f"{model}.yaml")


def _wrap_once(cls, method, make_wrapper):
    """Replace ``cls.method`` by ``make_wrapper(original)``, unless that was done already."""
    original = getattr(cls, method)
    if getattr(original, "__wrapped_by_recbole_ssm__", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__wrapped_by_recbole_ssm__ = True
    setattr(cls, method, wrapper)


def register():
    """Register our models with RecBole and install the checks described above; idempotent."""
    for name, module_path in MODEL_MODULES.items():
        sys.modules[f"recbole.model.sequential_recommender.{name.lower()}"] = (
            importlib.import_module(module_path))

    from recbole.config.configurator import Config
    from recbole.data.dataset.sequential_dataset import SequentialDataset

    from recbole_ssm.models import checks

    overall_yaml = os.path.realpath(os.path.join(
        os.path.dirname(sys.modules[Config.__module__].__file__), "..", "properties", "overall.yaml"))

    def model_defaults_after_overall_yaml(read_yaml):
        def read_yaml_then_model_defaults(self, file):
            config_dict = read_yaml(self, file)
            defaults = default_config_file(getattr(self, "model", None))
            if defaults and os.path.realpath(file) == overall_yaml:
                read_yaml(self, defaults)
            return config_dict
        return read_yaml_then_model_defaults

    def settings_checked_first(set_default_parameters):
        def check_then_set_default_parameters(self):
            if self.model in MODEL_MODULES:
                checks.check_run_config(self.model_class, self.final_config_dict)
            set_default_parameters(self)
        return check_then_set_default_parameters

    def splits_checked(build):
        def build_then_check_splits(self):
            if self.config["model"] not in MODEL_MODULES:
                return build(self)
            interactions_per_user = np.bincount(np.asarray(self.inter_feat[self.uid_field]))
            splits = build(self)
            checks.check_splits(self, interactions_per_user, *splits)
            return splits
        return build_then_check_splits

    def config_files_checked(_):
        def load_config_files(self, file_list):
            return checks.read_config_files(file_list, self.yaml_loader)
        return load_config_files

    _wrap_once(Config, "_load_config_files", config_files_checked)
    _wrap_once(Config, "_update_internal_config_dict", model_defaults_after_overall_yaml)
    _wrap_once(Config, "_set_default_parameters", settings_checked_first)
    _wrap_once(SequentialDataset, "build", splits_checked)
