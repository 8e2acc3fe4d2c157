"""The fixes that let RecBole 1.2.1 run on today's Python, NumPy and PyTorch, in one place.

:func:`apply` (called by ``import recbole_ssm``) makes nine targeted changes to RecBole, each one
covered by ``tests/test_compat.py`` (5 to 7 by ``tests/test_compat_numpy2.py``, 9 by
``tests/test_distributed.py``):

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
9. Multi-process runs (RecBole's DDP: ``run_recboles``, the ``--nproc`` / ``--world_size`` flags):

   a. ``Config._init_device`` asserted one GPU per process and hard-wired nccl and CUDA, so no run
      started on a CPU. Processes now run on CUDA with nccl when ``gpu_id`` names GPUs and CUDA is
      available, else on the CPU with gloo; the config key ``ddp_backend`` overrides the backend and
      ``ddp_timeout`` (seconds) bounds every wait for the other processes. CPU processes share the
      cores (each gets cores / nproc threads unless ``OMP_NUM_THREADS`` is set). An unusable
      setting (more processes than GPUs, ranks beyond ``world_size``, nccl without GPUs, a port in
      use, a rank that never joins) raises :class:`DistributedSetupError` saying so. Only rank 0
      (of all machines) logs, shows progress, writes a log file or TensorBoard events, and saves
      datasets, dataloaders and checkpoints; the other ranks log errors to stderr.
   b. On CPUs the trainer wraps the model in DDP without device ids (RecBole passed the local
      rank, which DDP refuses for CPU modules) and keeps BatchNorm (SyncBatchNorm is GPU-only).
   c. Each rank named the checkpoint after its own clock (one-second resolution), so ranks could
      disagree on the file to load at test time: the trainer's time stamp is now rank 0's.
   d. Rank 0 saved the checkpoint while the others went on, so they could load it before it was
      complete (or, when their load failed, leave rank 0 waiting forever: the test-phase hang of
      RecBole issue #1811): every rank now waits until the checkpoint is written, then loads it
      with the allow-list of fix 3.
   e. Evaluation used ``DistributedSampler``, which pads each rank's share with repeated users, and
      averaged each rank's rounded metrics weighted by its number of batches. Each rank now
      evaluates a contiguous, unpadded share of the users; the rows the collector gathers are
      concatenated across ranks in rank order, and every rank computes the metrics from all of
      them: the result equals a single-process evaluation (full ranking; sampled evaluation draws
      each rank's negatives from its own generator).
   f. A checkpoint of a multi-process run pickles its multi-process config, so
      ``load_data_and_model`` failed in a single process ("Default process group has not been
      initialized"): a config unpickled outside a multi-process run now describes a single-process
      one.
   g. RecBole's ``run`` spawns processes that start in ``run_recboles``; a process spawned from an
      interactive session imported only RecBole, without our models or these fixes. They now
      start in :func:`run_recboles`, whose module imports recbole_ssm first.
   h. ``Dataset._download`` called ``barrier()`` in single-process runs too (RecBole issue #1989),
      and the other ranks could see the dataset folder appear mid-download and load it partly.
      The barrier is now only in multi-process runs, and there rank 0 downloads a missing dataset,
      then each other machine's local rank 0 if it is still missing there, before any rank loads.
   i. No process left its process group, and a gloo process that exits without leaving it can die
      of SIGABRT in the interpreter's shutdown (half of the two-rank test runs here), so a finished
      run reported a failure: each process leaves it at exit.
"""
import atexit
import contextlib
import datetime
import enum
import functools
import importlib
import importlib.util
import logging
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
# The collector's entries with one row per evaluated user (per interaction for value metrics): those
# that ``Collector.get_data_struct`` resets after each evaluation.
EVAL_ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")
# Process-group backends that PyTorch may be built with, listed when the requested one is missing.
KNOWN_DDP_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


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


def _wrapped_once(function, around):
    """``function`` called as ``around(function, *args, **kwargs)``; one already so wrapped is left
    as it is."""
    arounds = getattr(function, "__recbole_ssm_arounds__", ())
    if around in arounds:
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return around(function, *args, **kwargs)

    wrapper.__recbole_ssm_arounds__ = (*arounds, around)
    return wrapper


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


class DistributedSetupError(RuntimeError):
    """A multi-process run cannot start with these settings."""


def global_rank():
    """This process's rank among the processes of all machines; 0 in a single-process run."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def check_process_layout(nproc, world_size, group_offset):
    """Raise DistributedSetupError unless this machine's ranks, ``group_offset`` to
    ``group_offset + nproc - 1``, are ranks of a ``world_size``-process run."""
    if nproc < 1:
        raise DistributedSetupError(f"nproc={nproc}: a machine runs at least one process")
    if group_offset < 0:
        raise DistributedSetupError(f"group_offset={group_offset}: ranks start at 0")
    if world_size < group_offset + nproc:
        raise DistributedSetupError(
            f"world_size={world_size} is too small: this machine's nproc={nproc} processes from "
            f"group_offset={group_offset} are ranks {group_offset} to {group_offset + nproc - 1}, "
            "and world_size counts the processes of all machines together")


def ddp_backend(requested, on_gpu):
    """The process-group backend: ``requested`` (config ``ddp_backend``), else nccl on GPUs and gloo
    on CPUs."""
    backend = str(requested).lower() if requested else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise DistributedSetupError(
            "ddp_backend='nccl' runs on GPUs only, and these processes run on the CPU (gpu_id is "
            "empty or CUDA is not available): use ddp_backend='gloo', or leave ddp_backend unset")
    if not torch.distributed.is_backend_available(backend):
        available = [name for name in KNOWN_DDP_BACKENDS if torch.distributed.is_backend_available(name)]
        raise DistributedSetupError(
            f"ddp_backend={requested!r} is not available in this PyTorch build "
            f"(available: {', '.join(available)})")
    return backend


def join_process_group(backend, rank, world_size, ip, port, timeout=None):
    """``init_process_group`` at ``tcp://ip:port``; ``timeout`` in seconds (None: PyTorch's default)."""
    address = f"tcp://{ip}:{port}"
    timeout = {} if timeout is None else {"timeout": datetime.timedelta(seconds=float(timeout))}
    try:
        torch.distributed.init_process_group(
            backend, init_method=address, rank=rank, world_size=world_size, **timeout)
    except torch.distributed.DistError as error:
        if "EADDRINUSE" in str(error):
            reason = f"port {port} is already in use on this machine; choose a free one with --port"
        else:
            reason = (f"not all {world_size} processes joined in time; start every machine's "
                      "run_recbole with the same --ip, --port and --world_size, and check that "
                      f"{ip}:{port} is reachable from each")
        raise DistributedSetupError(
            f"rank {rank} could not join the process group at {address}: {reason} ({error})"
        ) from error
    atexit.register(leave_process_group)


def leave_process_group():
    """``destroy_process_group()`` if this process is still in one. A process that exits without
    it can die of SIGABRT while the interpreter shuts down ("terminate called without an active
    exception": gloo's threads outlive it), which fails a finished run; registered at exit."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init_device(self):
    """RecBole's ``Config._init_device``, with multi-process runs on GPUs (nccl) and on CPUs (gloo)."""
    config = self.final_config_dict
    gpu_id = config["gpu_id"]
    config["gpu_id"] = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
    os.environ["CUDA_VISIBLE_DEVICES"] = config["gpu_id"]
    on_gpu = len(config["gpu_id"]) > 0 and torch.cuda.is_available()
    if "local_rank" not in config:
        config.update(single_spec=True, local_rank=0,
                      device=torch.device("cuda" if on_gpu else "cpu"))
        return
    nproc, local_rank = config["nproc"], config["local_rank"]
    check_process_layout(nproc, config["world_size"], config["offset"])
    if on_gpu and nproc > torch.cuda.device_count():
        raise DistributedSetupError(
            f"nproc={nproc} processes need one GPU each, and gpu_id='{config['gpu_id']}' makes "
            f"{torch.cuda.device_count()} visible: list more (e.g. --gpu_id=0,1), lower --nproc, "
            "or run on CPUs with --gpu_id=''")
    backend = ddp_backend(config.get("ddp_backend"), on_gpu)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # The processes share this machine's cores, of which PyTorch would give each all.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // nproc))
    join_process_group(backend, config["offset"] + local_rank, config["world_size"],
                       config["ip"], config["port"], config.get("ddp_timeout"))
    config.update(single_spec=False, device=device)
    if global_rank() != 0:
        config.update(state="error", show_progress=False, verbose=False,
                      save_dataset=False, save_dataloaders=False)


def unpickle_config(self, state):
    """``Config.__setstate__``: unpickled outside a multi-process run, a config describes a single
    process."""
    self.__dict__.update(state)
    if not torch.distributed.is_initialized():
        self.final_config_dict["single_spec"] = True


def init_trainer(self, config, model):
    """RecBole's ``AbstractTrainer.__init__``; device ids and SyncBatchNorm only on GPUs."""
    from torch.nn.parallel import DistributedDataParallel

    self.config = config
    self.model = model
    if not config["single_spec"]:
        device_ids = None
        if config["device"].type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [config["device"].index]
        self.distributed_model = DistributedDataParallel(self.model, device_ids=device_ids)


def wait_for_all_ranks(config):
    """``barrier()``; on GPUs on this process's device (older PyTorch guessed it from the rank)."""
    device = config["device"]
    torch.distributed.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def rank0_local_time():
    """RecBole's ``get_local_time``; in a multi-process run, rank 0's on every rank."""
    from recbole.utils import get_local_time

    local_time = [get_local_time()]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(local_time, src=0)
    return local_time[0]


def _saved_by_rank0_for_all(save_checkpoint, self, *args, **kwargs):
    """Rank 0 of all machines writes the checkpoint; every rank returns once it is written."""
    if self.config["single_spec"]:
        return save_checkpoint(self, *args, **kwargs)
    if global_rank() == 0:
        save_checkpoint(self, *args, **kwargs)
    wait_for_all_ranks(self.config)


def keep_metrics_of_all_ranks(self, result, num_sample):
    """``Trainer._map_reduce``: the metrics already come from the rows of all ranks (fix 9e)."""
    return result


def contiguous_share(size, rank, ranks):
    """Rank ``rank`` of ``ranks``'s share of ``range(size)``: contiguous, unpadded, sizes within one of
    each other; the shares in rank order are ``range(size)``."""
    return range(size * rank // ranks, size * (rank + 1) // ranks)


class ContiguousShardSampler(torch.utils.data.Sampler):
    """This rank's :func:`contiguous_share` of ``data``, for evaluation; called as RecBole calls
    ``DistributedSampler`` (evaluation loaders neither shuffle nor drop)."""

    def __init__(self, data, shuffle=False, drop_last=False):
        if shuffle or drop_last:
            raise ValueError("evaluation shards are neither shuffled nor cut")
        ranks = torch.distributed.get_world_size()
        if 0 < len(data) < ranks:
            # A rank without a batch would skip the evaluation that the others wait for it in.
            raise ValueError(f"{len(data)} evaluation samples cannot be shared by {ranks} "
                             "processes: use at most as many processes as samples")
        self.indices = contiguous_share(len(data), torch.distributed.get_rank(), ranks)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@contextlib.contextmanager
def evaluation_shards_unpadded():
    """Within this block, RecBole's dataloaders shard with :class:`ContiguousShardSampler`."""
    distributed = torch.utils.data.distributed
    distributed_sampler = distributed.DistributedSampler
    distributed.DistributedSampler = ContiguousShardSampler
    try:
        yield
    finally:
        distributed.DistributedSampler = distributed_sampler


def _rows_of_all_ranks(get_data_struct, self):
    """The collected data, with the rows of every rank in rank order in a multi-process run."""
    struct = get_data_struct(self)
    if self.config["single_spec"]:
        return struct
    rows = {key: struct[key] for key in EVAL_ROW_KEYS if key in struct}
    rows_of_ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows_of_ranks, rows)
    for key in EVAL_ROW_KEYS:
        parts = [rank_rows[key] for rank_rows in rows_of_ranks if key in rank_rows]
        if parts:
            struct[key] = torch.cat(parts)
    return struct


@contextlib.contextmanager
def barrier_skipped():
    """Within this block, ``torch.distributed.barrier()`` does nothing."""
    barrier = torch.distributed.barrier
    torch.distributed.barrier = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.distributed.barrier = barrier


def _downloaded_before_loading(load_data, self, token, dataset_path):
    """In a multi-process run, rank 0 downloads a missing dataset, then each other machine's local
    rank 0 if the folder is still missing there (no shared filesystem), while all others wait."""
    if not self.config["single_spec"]:
        for downloads in (global_rank() == 0, self.config["local_rank"] == 0):
            if downloads and not os.path.exists(dataset_path):
                self._download()
            wait_for_all_ranks(self.config)
    return load_data(self, token, dataset_path)


def run_recboles(rank, model, dataset, config_file_list, kwargs):
    """RecBole's ``run_recboles``, where each spawned process starts: unpickling it there imports
    recbole_ssm (these fixes, our models) first."""
    from recbole.quick_start import quick_start

    kwargs["config_dict"] = {**(kwargs.get("config_dict") or {}), "local_rank": rank}
    quick_start.run_recbole(model, dataset, config_file_list, **kwargs)


def _logs_on_rank0(init_logger, config):
    """RecBole's ``init_logger``; ranks other than 0 log errors only, to stderr, without a log file."""
    if global_rank() == 0:
        return init_logger(config)
    logging.basicConfig(level=logging.ERROR, handlers=[logging.StreamHandler()])


class _DiscardingWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _tensorboard_on_rank0(get_tensorboard, logger):
    """RecBole's ``get_tensorboard``; ranks other than 0 get a writer that discards everything."""
    return get_tensorboard(logger) if global_rank() == 0 else _DiscardingWriter()


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


def _apply_distributed_fixes(quick_start_module):
    import recbole.utils
    from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader
    from recbole.data.dataset.dataset import Dataset
    from recbole.evaluator.collector import Collector
    from recbole.trainer import trainer

    trainer.AbstractTrainer.__init__ = init_trainer
    trainer.get_local_time = rank0_local_time
    trainer.get_tensorboard = _wrapped_once(trainer.get_tensorboard, _tensorboard_on_rank0)
    trainer.Trainer._save_checkpoint = _wrapped_once(trainer.Trainer._save_checkpoint,
                                                     _saved_by_rank0_for_all)
    trainer.Trainer._map_reduce = keep_metrics_of_all_ranks
    Collector.get_data_struct = _wrapped_once(Collector.get_data_struct, _rows_of_all_ranks)
    for loader in (FullSortEvalDataLoader, NegSampleEvalDataLoader):
        loader.__init__ = _run_within(evaluation_shards_unpadded, loader.__dict__["__init__"])
    Dataset._download = _run_within(barrier_skipped, Dataset._download)
    Dataset._load_data = _wrapped_once(Dataset._load_data, _downloaded_before_loading)
    for module in (recbole.utils, quick_start_module):
        module.init_logger = _wrapped_once(module.init_logger, _logs_on_rank0)
    quick_start_module.run_recboles = recbole.quick_start.run_recboles = run_recboles


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
    Config._init_device = init_device
    Config.__setstate__ = unpickle_config
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
    _apply_distributed_fixes(quick_start_module)
