"""What is checked before a run of our models does any work.

- :func:`check_model_config`: every config key our models read (type, range, divisibility,
  combination), when a model is built and, through the hook in :mod:`recbole_ssm.registry`, when
  RecBole's ``Config`` is built, before any data is loaded;
- :func:`check_run_config`: that, plus the RecBole keys our runs depend on, and the negative sampling
  that ``loss_type: BPR`` needs (a default when none is given);
- :func:`check_splits`: that the evaluation splits RecBole built can be evaluated, before training;
- :func:`read_config_files`: config files read for RecBole (any model), each one a YAML mapping.

Every refusal is a :class:`RunCheckError` whose text names the key, its value and what is allowed.
"""
import logging
import math
from numbers import Real

import yaml

from recbole_ssm.modules.arguments import is_integer
from recbole_ssm.ops import backend
from recbole_ssm.ops.backend import BACKENDS

LOSS_TYPES = ("CE", "BPR")
NEGATIVE_DISTRIBUTIONS = ("uniform", "popularity")
# What ``loss_type: BPR`` samples when ``train_neg_sample_args`` is not given: one uniform negative
# item per positive, as RecBole's own default for pairwise models.
BPR_DEFAULT_NEGATIVES = {"distribution": "uniform", "sample_num": 1}
# The widths of causal-conv1d's fused kernel, used for the causal convolution with ssm_backend: cuda.
CUDA_CONV_WIDTHS = range(2, 5)


class RunCheckError(ValueError):
    """A setting or a dataset that a run of our models cannot use; the text says what is wrong."""


def _value(config, key):
    """``config[key]``, None when absent (as RecBole's ``Config`` answers; a dict would raise)."""
    return config[key] if key in config else None


def _refuse(key, value, allowed, show_type=False):
    shown = f"{value!r} (type {type(value).__name__})" if show_type else repr(value)
    raise RunCheckError(f"{key} = {shown} is not allowed: {allowed}")


def _integer(key, value, minimum):
    if not is_integer(value, minimum):
        _refuse(key, value, f"expected an integer >= {minimum}", show_type=True)
    return int(value)


def _number(key, value, minimum, maximum=math.inf, open_minimum=False):
    """A real number in [minimum, maximum) (in (minimum, maximum) with ``open_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (
        (minimum < value if open_minimum else minimum <= value) and value < maximum
    ):
        _refuse(key, value, f"expected a number in {'(' if open_minimum else '['}{minimum}, {maximum})",
                show_type=True)
    return value


def _choice(key, value, choices):
    if value not in choices:
        _refuse(key, value, f"expected one of {', '.join(map(str, choices))}")
    return value


def check_model_config(model_class, config):
    """Check the keys that ``model_class`` (an ``SSMSequentialRecommender``) reads from ``config``
    (a RecBole ``Config`` or a dict); raises :class:`RunCheckError`."""
    def integer(key):
        return _integer(key, _value(config, key), 1)

    hidden_size = integer("hidden_size")
    integer("num_layers")
    integer("MAX_ITEM_LIST_LENGTH")
    _number("dropout_prob", _value(config, "dropout_prob"), 0, 1)
    if _choice("loss_type", _value(config, "loss_type"), LOSS_TYPES) == "BPR":
        _check_negatives(_value(config, "train_neg_sample_args"))
    backend = _value(config, "ssm_backend")
    if backend is not None:
        _choice("ssm_backend", backend, BACKENDS)
    sizes = {key: integer(key) for key in model_class.mixer_config_keys}

    d_conv = sizes["d_conv"]
    if model_class.centred_conv and d_conv % 2 == 0:
        _refuse("d_conv", d_conv, f"{model_class.__name__}'s centred convolution needs an odd width")
    if not model_class.centred_conv and backend == "cuda" and d_conv not in CUDA_CONV_WIDTHS:
        _refuse("d_conv", d_conv, "with ssm_backend: cuda, causal-conv1d's kernel takes widths "
                f"{CUDA_CONV_WIDTHS[0]} to {CUDA_CONV_WIDTHS[-1]}")
    if "headdim" in sizes:
        d_inner = sizes["expand"] * hidden_size
        if d_inner % sizes["headdim"]:
            _refuse("headdim", sizes["headdim"], "it must divide expand * hidden_size = "
                    f"{sizes['expand']} * {hidden_size} = {d_inner}")
        nheads = d_inner // sizes["headdim"]
        if nheads % sizes["ngroups"]:
            _refuse("ngroups", sizes["ngroups"], "it must divide the number of heads, "
                    f"expand * hidden_size / headdim = {nheads}")


def check_run_config(model_class, config):
    """Before RecBole completes its ``Config`` (``config``: the dict of final values): for
    ``loss_type: BPR`` without ``train_neg_sample_args``, set ``BPR_DEFAULT_NEGATIVES``; then
    :func:`check_model_config`, the RecBole keys a run of our models depends on, and a CUDA device
    for ``ssm_backend: cuda``."""
    if config.get("loss_type") == "BPR" and config.get("train_neg_sample_args") in (None, "None"):
        config["train_neg_sample_args"] = dict(BPR_DEFAULT_NEGATIVES)
    check_model_config(model_class, config)
    for key in ("epochs", "train_batch_size", "eval_batch_size"):
        _integer(key, _value(config, key), 1)
    for key in ("eval_step", "stopping_step"):
        _integer(key, _value(config, key), 0)
    _number("learning_rate", _value(config, "learning_rate"), 0, open_minimum=True)
    _number("weight_decay", _value(config, "weight_decay"), 0)
    _check_valid_metric(config)
    if config.get("ssm_backend") == "cuda" and not backend.cuda_device_available():
        _refuse("ssm_backend", "cuda", "PyTorch sees no CUDA device here; use auto or torch")


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _check_valid_metric(config):
    """``valid_metric`` must be one that evaluation computes: one of ``metrics``, at a k of ``topk``
    for ranking metrics (RecBole would fail with a KeyError after the first training epoch)."""
    metrics = [str(metric).lower() for metric in _as_list(config["metrics"])]
    topk = _as_list(config["topk"])
    valid_metric = config["valid_metric"]
    name, at, k = str(valid_metric).lower().partition("@")
    if name not in metrics or (at and not (k.isdigit() and int(k) in topk)):
        _refuse("valid_metric", valid_metric, f"expected one of metrics ({', '.join(metrics)}), "
                f"at a k of topk ({', '.join(map(str, topk))}) for a ranking metric, e.g. "
                f"{metrics[0]}@{topk[0]}")


def _check_negatives(negatives):
    """``train_neg_sample_args`` for BPR, whose batches need a negative item."""
    if not isinstance(negatives, dict):
        _refuse("train_neg_sample_args", negatives, "loss_type BPR needs negative items: expected a "
                "dict such as {distribution: uniform, sample_num: 1}")
    _choice("train_neg_sample_args.distribution", negatives.get("distribution"), NEGATIVE_DISTRIBUTIONS)
    if "sample_num" in negatives:
        _integer("train_neg_sample_args.sample_num", negatives["sample_num"], 1)


# From how many interactions on RecBole's leave-one-out gives a user a sample in each split: a
# sequence of n interactions is n - 1 (history, next item) samples; the last goes to test and the
# one before to validation, as long as one is left for training.
LEAVE_ONE_OUT_MINIMUM = {"valid_and_test": {"valid": 4, "test": 3}, "valid_only": {"valid": 3},
                         "test_only": {"test": 3}}


def _evaluated_splits(config):
    """The names of the splits ("valid", "test") that the evaluation settings give any data."""
    if config["benchmark_filename"]:  # RecBole reads train, valid and test files
        return ("valid", "test")
    (mode, args), = config["eval_args"]["split"].items()
    if mode == "LS":
        return tuple(LEAVE_ONE_OUT_MINIMUM.get(args, ()))
    ratios = [*args, 0, 0]
    return tuple(name for name, ratio in zip(("valid", "test"), ratios[1:3]) if ratio > 0)


def check_splits(dataset, interactions_per_user, train, valid, test):
    """After RecBole split ``dataset``: an error when there is nothing to train on, no test sample
    although the settings ask for a test, or a ``topk`` above the number of items; a warning when the
    validation split is empty (then there is no early stopping, and the last epoch's model is tested).

    ``interactions_per_user``: the interaction count of each user id, before the split.
    """
    config = dataset.config
    split = config["eval_args"]["split"]
    (mode, args), = split.items()
    active = interactions_per_user[interactions_per_user > 0]
    counts = (f"{config['dataset']} has {len(active)} users after filtering, with at most "
              f"{int(active.max(initial=0))} interactions each")

    def minimum(name):
        needed = LEAVE_ONE_OUT_MINIMUM.get(args, {}).get(name) if mode == "LS" else None
        return f"; leave-one-out gives a user a {name} sample from {needed} interactions on" if needed else ""

    if len(train) == 0:
        raise RunCheckError(f"nothing to train on: the training split is empty ({counts}; a user's "
                            "sequence gives a training sample from 2 interactions on)")
    evaluated = _evaluated_splits(config)
    if "test" in evaluated and len(test) == 0:
        raise RunCheckError(
            f"cannot evaluate: the test split is empty with eval_args split {split} ({counts}"
            f"{minimum('test')}). Use more data, lower user_inter_num_interval, or change eval_args")
    items = dataset.item_num - 1  # without RecBole's padding item
    if evaluated and max(config["topk"]) > items:
        _refuse("topk", config["topk"], f"{config['dataset']} has {items} items after filtering, "
                "and every k must be at most that")
    if "valid" in evaluated and len(valid) == 0:
        logging.getLogger().warning(
            f"the validation split is empty with eval_args split {split} ({counts}{minimum('valid')}): "
            "no early stopping; the model of the last epoch is tested")


def read_config_files(paths, loader):
    """The settings of these YAML files, later files overriding earlier ones, read with RecBole's
    ``loader``; an empty file is no settings. A missing file, invalid YAML, or a document that is
    not a mapping of keys is a :class:`RunCheckError` naming the file."""
    settings = {}
    for path in paths or ():
        try:
            with open(path, encoding="utf-8") as handle:
                document = yaml.load(handle, Loader=loader)  # its errors name the file
        except OSError as error:
            raise RunCheckError(f"config file {path}: {error.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RunCheckError(f"config file {path} is not valid YAML: {error}") from None
        if document is not None and not isinstance(document, dict):
            raise RunCheckError(f"config file {path} must hold 'key: value' lines, not a "
                                f"{type(document).__name__}")
        settings.update(document or {})
    return settings
