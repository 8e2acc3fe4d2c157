"""Code that tests run as ranks 0 and 1 of a gloo process group, in spawned processes.

The spawned processes import this module, not ``tests/conftest.py`` (which sets ``OMP_NUM_THREADS``
for the whole test session), so that they start as a user's processes would.
"""
import os
import socket
import threading
import time
import zipfile

import recbole
import torch

import recbole_ssm  # noqa: F401  (the compat fixes, in each spawned process)
from recbole_ssm.ops.selective_scan import selective_scan
from recbole.config import Config
from recbole.data import create_dataset
from recbole.data.dataset import dataset as dataset_module
from recbole.trainer import trainer as trainer_module

# Seconds that ranks or a multi-process run may take here (a run takes 20-90 s on the shared 2-core
# machine): a hang fails the test instead of blocking the suite.
RUN_TIMEOUT = 600
BUNDLED_ML100K = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")


def free_port():
    """A TCP port that nothing on this machine listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(worker, tmp_path):
    """Run ``worker(rank, port, tmp_path)`` as ranks 0 and 1 (spawned processes, a hang fails the
    test); returns the text each rank wrote to ``tmp_path / f"rank{rank}"``."""
    ranks = torch.multiprocessing.spawn(worker, args=(free_port(), tmp_path), nprocs=2, join=False)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not ranks.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not finish within {RUN_TIMEOUT} s (a hang)")
    finally:
        for process in ranks.processes:
            process.kill()
    return [(tmp_path / f"rank{rank}").read_text() for rank in range(2)]


def rank_layout(rank, port):
    """The config keys that RecBole's ``run_recboles`` sets for rank ``rank`` of 2 on this machine."""
    return {"local_rank": rank, "nproc": 2, "world_size": 2, "offset": 0, "ip": "127.0.0.1",
            "port": port}


def serve_ml100k_as_ml1m(url, folder):
    """Stands in for RecBole's ``download_url`` (no network here): ml-100k's interactions, zipped
    as ml-1m."""
    archive = os.path.join(folder, "ml-1m.zip")
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(os.path.join(BUNDLED_ML100K, "ml-100k.inter"), "ml-1m.inter")
    return archive


def downloading_config(tmp_path, **layout):
    """A config of the "ml-1m" that the stand-in download provides, in ``tmp_path``."""
    return Config(model="Mamba2Rec", dataset="ml-1m",
                  config_dict={"data_path": str(tmp_path), **layout})


def compiled_kernel_threads():
    """Run the compiled (Numba) selective scan on a batch that it splits over its threads; the
    number of threads it ran on: this one and those of its pool."""
    batch, d_inner, d_state, length = 16, 4, 2, 3
    scan_input = torch.randn(batch, d_inner, length)
    selective_scan(scan_input, torch.rand(batch, d_inner, length), -torch.rand(d_inner, d_state),
                   torch.randn(batch, d_state, length), torch.randn(batch, d_state, length),
                   backend="numba")
    return 1 + sum(thread.name.startswith("recbole-ssm") for thread in threading.enumerate())


def write_threads_and_time(rank, port, tmp_path):
    """Join as RecBole's Config does; write this process's torch threads, the threads the compiled
    kernels ran on, and the trainer's time stamp."""
    Config(model="Mamba2Rec", dataset="ml-100k", config_dict=rank_layout(rank, port))
    threads = f"{torch.get_num_threads()} {compiled_kernel_threads()}"
    time.sleep(1.5 * rank)  # rank 1 asks its clock more than a second later
    (tmp_path / f"rank{rank}").write_text(f"{threads} {trainer_module.get_local_time()}")


def download_and_load(rank, port, tmp_path):
    def slow_download(url, folder):
        with open(tmp_path / "downloads", "a") as downloads:
            downloads.write(f"rank {rank}\n")
        time.sleep(2)  # the dataset folder exists, its files do not yet
        return serve_ml100k_as_ml1m(url, folder)

    dataset_module.decide_download = lambda url: True
    dataset_module.download_url = slow_download
    config = downloading_config(tmp_path, **rank_layout(rank, port))
    time.sleep(rank)  # rank 1 looks for the dataset while rank 0 downloads it
    (tmp_path / f"rank{rank}").write_text(str(create_dataset(config).inter_num))
