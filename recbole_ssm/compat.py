"""The fixes that let RecBole 1.2.1 run on today's Python, NumPy and PyTorch, in one place.

:func:`apply` (called by ``import recbole_ssm``) makes eight targeted changes to RecBole, each one
covered by ``tests/test_compat.py`` (5 to 7 by ``tests/test_compat_numpy2.py``):

1. NumPy 2: ``Config.compatibility_settings`` assigns ``np.float = np.float_`` and friends; NumPy 2
   removed ``np.float_``, so every ``Config(...)`` failed. It now sets only the aliases that the
   installed NumPy lacks, to the same types as before.
2. No ray: ``recbole.quick_start`` imports ``ray.tune`` at module level, although only RecBole's
   hyper-parameter tuning uses it, and ray <= 2.6.3 (RecBole's pin) has no wheel for Python >= 3.12.
   Without ray, ``recbole.quick_start`` is imported with a stand-in whose use raises a clear error.
3. PyTorch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses RecBole's own
   checkpoints (they pickle the ``Config`` with protocol 4). RecBole's three loading sites
   (``Trainer.resume_checkpoint``, ``Trainer.evaluate`` and ``load_data_and_model``) now unpickle
   with an allow-list: whatever ``weights_only=True`` accepts (torch's own list, such as tensors and
   ``_codecs.encode`` for bytes in the default protocol 2, and ``torch.serialization.add_safe_globals``),
   plus RecBole's config and enums, recommender classes, NumPy scalars and arrays. Anything else,
   such as a pickled callable, is refused with :class:`UnsafeCheckpointError`; an empty, cut short or
   damaged file with :class:`IncompleteCheckpointError`, naming it. ``weights_only`` stays the
   default for every other ``torch.load``.
4. ray 2.6.3's ``pkg_resources`` deprecation warning is silenced (setuptools < 81 is pinned where
   ray is installed, because setuptools 81 removed ``pkg_resources``).
5. pandas 3 (copy-on-write): RecBole fills missing values with
   ``df[field].fillna(..., inplace=True)``, which under copy-on-write fills a temporary copy and
   leaves ``df`` as it was. An empty ``token_seq`` / ``float_seq`` value then failed to load
   ("'float' object has no attribute 'split'"), and missing tokens and floats of user/item
   features stayed NaN (NaN floats reached the batches). Seq fields are now filled as RecBole's
   ``_load_feat`` reads them, and ``Dataset._fill_nan`` assigns its results.
6. pandas 3: ``Series.agg(len)`` returns the Series' length instead of each element's (pandas 2
   warned about the change). RecBole's five methods that call it (remapping and normalising seq
   fields, ``item_length`` of benchmark files) failed or computed wrong lengths; within them it is
   again per element.
7. pandas 3's read-only column arrays make PyTorch warn when RecBole turns a column into a tensor;
   that warning is silenced for RecBole's dataset code, which drops each frame once converted.
8. Importing RecBole's sequential models (``recbole/model/sequential_recommender/sine.py``) calls
   ``torch.autograd.set_detect_anomaly(True)`` for the whole process, which made every backward pass
   check each gradient for NaN and record a traceback per operation (SASRec's training step took 1.6x
   as long). The package is imported once here and autograd's anomaly mode put back as it was.
"""
import contextlib
import enum
import functools
import importlib
import importlib.util
import os
import pickle
import re
import sys
import types
import warnings
import zipfile

import numpy as np
import pandas as pd
import torch

# NumPy aliases that RecBole expects, and the types RecBole assigned to them.
NUMPY_ALIASES = {
    "bool": "bool_", "int": "int_", "float": "float64", "complex": "complex128",
    "object": "object_", "str": "str_", "long": "int_", "unicode": "str_",
}

# Globals a RecBole checkpoint may reference besides what torch.load(weights_only=True) accepts,
# RecBole enums and recommender classes.
CHECKPOINT_GLOBALS = frozenset({
    ("builtins", "frozenset"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("recbole.config.configurator", "Config"),
    ("yaml.loader", "FullLoader"),
})
RECOMMENDER_MODULES = ("recbole.model.", "recbole_ssm.models.")

# The RecBole methods that call ``Series.agg(len)`` for the length of each element of a seq field.
AGG_LEN_METHODS = (
    ("recbole.data.dataset.dataset", "Dataset", "_normalize"),
    ("recbole.data.dataset.dataset", "Dataset", "_discretization"),
    ("recbole.data.dataset.dataset", "Dataset", "_remap"),
    ("recbole.data.dataset.kg_dataset", "KnowledgeBasedDataset", "_reset_ent_remapID"),
    ("recbole.data.dataset.sequential_dataset", "SequentialDataset", "_benchmark_presets"),
)
SEQ_FIELD_TYPES = ("token_seq", "float_seq")
# pandas' warning for ``df[field].fillna(..., inplace=True)``: a FutureWarning in pandas 2, a
# ChainedAssignmentError in pandas 3.
CHAINED_INPLACE_WARNING = r".*through chained assignment using an inplace method"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references something that is not part of a RecBole checkpoint."""


class IncompleteCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that is empty, cut short or damaged."""


def torch_safe_globals():
    """The ``module.name`` globals that ``torch.load(weights_only=True)`` accepts: torch's own
    allow-list and those added with ``torch.serialization.add_safe_globals`` (torch >= 2.4)."""
    from torch import _weights_only_unpickler as weights_only

    user_added = getattr(weights_only, "_get_user_allowed_globals", dict)
    return weights_only._get_allowed_globals().keys() | user_added().keys()


class _CheckpointUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in CHECKPOINT_GLOBALS or f"{module}.{name}" in torch_safe_globals():
            return super().find_class(module, name)
        if module == "recbole.utils.enum_type" or module.startswith(RECOMMENDER_MODULES):
            found = super().find_class(module, name)
            if _is_checkpoint_type(found):
                return found
        raise UnsafeCheckpointError(
            f"refusing to load this checkpoint: it references {module}.{name}, which is not part "
            "of a RecBole checkpoint (tensors, RecBole's Config and enums, recommender classes). "
            "A checkpoint can run arbitrary code when unpickled; if you trust this file, load it "
            "yourself with torch.load(path, weights_only=False), or mark that type safe with "
            "torch.serialization.add_safe_globals."
        )


def _is_checkpoint_type(found):
    from recbole.model.abstract_recommender import AbstractRecommender

    return isinstance(found, type) and (
        issubclass(found, enum.Enum) or issubclass(found, AbstractRecommender))


# torch.load's pickle_module: the standard pickle module with the restricted Unpickler.
checkpoint_pickle = types.SimpleNamespace(
    __name__=__name__ + ".checkpoint_pickle",
    Unpickler=_CheckpointUnpickler,
    load=lambda file, **kwargs: _CheckpointUnpickler(file, **kwargs).load(),
)


def load_checkpoint(path, map_location=None):
    """Load a RecBole checkpoint (``.pth`` written by RecBole's trainer) with the allow-list.

    ``path``: a file name or an open binary file. A file that is empty, cut short or damaged (torch's
    zip format carries a CRC-32 of each entry, checked here first) raises
    :class:`IncompleteCheckpointError` naming it."""
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", path)
    damage = checkpoint_file_damage(path) if isinstance(path, (str, os.PathLike)) else None
    if damage is None:
        try:
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=checkpoint_pickle)
        except UnsafeCheckpointError:
            raise
        except (EOFError, pickle.UnpicklingError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not TRUNCATION_MESSAGES.search(str(error)):
                raise  # not about the file, e.g. a device that map_location does not have
            damage = f"its data breaks off or is damaged ({type(error).__name__}: {error})"
    raise IncompleteCheckpointError(f"{name} is not a complete checkpoint: {damage}")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip archive
# torch.load's RuntimeErrors for a file cut short: in its zip reader, or in a legacy-format file.
TRUNCATION_MESSAGES = re.compile(r"PytorchStreamReader failed|unexpected EOF")


def checkpoint_file_damage(path):
    """What makes the file ``path`` no whole checkpoint, seen without unpickling: empty, or a zip
    archive cut short or with an entry failing its CRC-32; None when nothing is seen (a missing
    file is left to torch.load's own error)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(ZIP_MAGIC))
    except OSError:
        return None
    if not head:
        return "the file is empty"
    if head != ZIP_MAGIC:
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except zipfile.BadZipFile:
        return "its zip archive is cut short or damaged"
    return None if broken is None else f"its entry {broken} is damaged (CRC-32 mismatch)"


@contextlib.contextmanager
def recbole_checkpoint_loading():
    """Within this block, a plain ``torch.load(f[, map_location])`` uses :func:`load_checkpoint`.

    Calls that pass ``weights_only`` or ``pickle_module`` are left as they are.
    """
    torch_load = torch.load

    def load(f, map_location=None, *args, **kwargs):
        if args or kwargs.keys() & {"weights_only", "pickle_module"}:
            return torch_load(f, map_location, *args, **kwargs)
        return load_checkpoint(f, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = torch_load


def _run_within(context, function):
    """``function`` running inside ``with context():``; a function wrapped once is left as it is."""
    if getattr(function, "__wrapped_by_recbole_ssm__", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with context():
            return function(*args, **kwargs)

    wrapper.__wrapped_by_recbole_ssm__ = True
    return wrapper


def _loads_recbole_checkpoints(function):
    return _run_within(recbole_checkpoint_loading, function)


@contextlib.contextmanager
def seq_fields_read_filled():
    """Within this block, ``pd.read_csv`` fills missing values of RecBole seq columns with ``""``.

    Seq columns are those whose header is ``name:token_seq`` or ``name:float_seq`` (RecBole's atomic
    files); this is the fill that RecBole's ``_load_feat`` means to do right after reading. Its own
    chained ``fillna(inplace=True)``, now without effect, is not warned about.
    """
    read_csv = pd.read_csv

    @functools.wraps(read_csv)
    def read_filled(*args, **kwargs):
        df = read_csv(*args, **kwargs)
        if isinstance(df, pd.DataFrame):
            for column in df.columns:
                if isinstance(column, str) and column.rpartition(":")[2] in SEQ_FIELD_TYPES:
                    df[column] = df[column].fillna("")
        return df

    pd.read_csv = read_filled
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CHAINED_INPLACE_WARNING)
            yield
    finally:
        pd.read_csv = read_csv


@contextlib.contextmanager
def series_agg_len_per_element():
    """Within this block, ``Series.agg(len)`` is each element's length, as before pandas 3."""
    agg = pd.Series.agg

    @functools.wraps(agg)
    def series_agg(self, func=None, *args, **kwargs):
        if func is len and not args and not kwargs:
            return self.map(len)
        return agg(self, func, *args, **kwargs)

    pd.Series.agg = series_agg
    try:
        yield
    finally:
        pd.Series.agg = agg


def fill_nan(self):
    """RecBole's ``Dataset._fill_nan``, its chained ``fillna(inplace=True)`` calls made assignments.

    Missing tokens become 0 (``[PAD]``), missing floats the field's mean, missing seqs empty arrays.
    """
    from recbole.utils import FeatureType, set_color

    self.logger.debug(set_color("Filling nan", "green"))
    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x)


def set_numpy_aliases(config=None):
    """RecBole's ``Config.compatibility_settings``, for NumPy 1 and 2: add only the missing aliases."""
    for alias, target in NUMPY_ALIASES.items():
        if alias not in np.__dict__:
            setattr(np, alias, getattr(np, target))


class _MissingRay:
    """Stands in for ``ray.<name>`` when ray is not installed; any use raises ImportError."""

    def __init__(self, name):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise ImportError(
            f"ray.{self._name} is needed only for RecBole's hyper-parameter tuning, and ray is not "
            "installed (RecBole pins ray<=2.6.3, which has no wheel for Python >= 3.12). Training "
            "and evaluation do not need it; for tuning, use Python 3.11 with 'pip install ray==2.6.3'."
        )

    __call__ = _fail

    def __getattr__(self, attribute):
        self._fail()


def _import_quick_start():
    """Import ``recbole.quick_start``; without ray, under a stand-in that is removed afterwards."""
    if "recbole.quick_start" in sys.modules or importlib.util.find_spec("ray") is not None:
        return importlib.import_module("recbole.quick_start")
    stand_in = types.ModuleType("ray")
    stand_in.__getattr__ = _MissingRay
    sys.modules["ray"] = stand_in
    try:
        return importlib.import_module("recbole.quick_start")
    finally:
        del sys.modules["ray"]


def _apply_dataset_fixes():
    from recbole.data.dataset.dataset import Dataset

    Dataset._load_feat = _run_within(seq_fields_read_filled, Dataset._load_feat)
    Dataset._fill_nan = fill_nan
    for module, class_name, method in AGG_LEN_METHODS:
        cls = getattr(importlib.import_module(module), class_name)
        setattr(cls, method, _run_within(series_agg_len_per_element, cls.__dict__[method]))


def _import_sequential_models_without_anomaly_mode():
    """Import RecBole's sequential models, keeping autograd's anomaly mode as it was (fix 8)."""
    anomaly_mode = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    importlib.import_module("recbole.model.sequential_recommender")
    torch.autograd.set_detect_anomaly(*anomaly_mode)


def apply():
    """Apply the fixes above; idempotent."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                            category=UserWarning, module=r"recbole\.data\.")

    from recbole.config.configurator import Config

    Config.compatibility_settings = set_numpy_aliases
    set_numpy_aliases()

    quick_start = _import_quick_start()
    from recbole.quick_start import quick_start as quick_start_module
    from recbole.trainer.trainer import Trainer

    Trainer.resume_checkpoint = _loads_recbole_checkpoints(Trainer.resume_checkpoint)
    Trainer.evaluate = _loads_recbole_checkpoints(Trainer.evaluate)
    wrapped = _loads_recbole_checkpoints(quick_start_module.load_data_and_model)
    quick_start_module.load_data_and_model = quick_start.load_data_and_model = wrapped

    _apply_dataset_fixes()
    _import_sequential_models_without_anomaly_mode()
