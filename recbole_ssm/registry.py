"""Makes RecBole find our models by name, with their default hyper-parameters.

RecBole's ``get_model(name)`` looks for a module ``recbole.model.<kind>_recommender.<name.lower()>``.
Each of our model modules is registered in ``sys.modules`` under that name, so RecBole's own lookup
(from ``Config``, ``run_recbole``, ``load_data_and_model``, ...) returns our class. RecBole reads a
model's defaults from ``recbole/properties/model/<Model>.yaml`` right after ``overall.yaml``; our
defaults, packaged in ``recbole_ssm/properties/<Model>.yaml``, are read at that same point, so config
files, config dicts and the command line override them in RecBole's usual order.
"""
import importlib
import os
import sys

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


def register():
    """Register our models with RecBole; idempotent."""
    for name, module_path in MODEL_MODULES.items():
        sys.modules[f"recbole.model.sequential_recommender.{name.lower()}"] = (
            importlib.import_module(module_path))

    from recbole.config.configurator import Config

    read_yaml = Config._update_internal_config_dict
    if getattr(read_yaml, "__wrapped_by_recbole_ssm__", False):
        return
    overall_yaml = os.path.realpath(os.path.join(
        os.path.dirname(sys.modules[Config.__module__].__file__), "..", "properties", "overall.yaml"))

    def read_yaml_then_model_defaults(self, file):
        config_dict = read_yaml(self, file)
        defaults = default_config_file(getattr(self, "model", None))
        if defaults and os.path.realpath(file) == overall_yaml:
            read_yaml(self, defaults)
        return config_dict

    read_yaml_then_model_defaults.__wrapped_by_recbole_ssm__ = True
    Config._update_internal_config_dict = read_yaml_then_model_defaults
