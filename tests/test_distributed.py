"""Multi-process runs (RecBole's DDP) on CPUs with gloo, through run_recbole: recbole_ssm.compat fix 9."""
import glob
import os
import pickle
import socket
import subprocess

import pytest
import torch
from recbole.config import Config
from recbole.data import create_dataset
from recbole.data.dataset import dataset as dataset_module
from recbole.quick_start import run_recbole

from recbole_ssm import compat
from recbole_ssm.cli import main
from tests import ranks
from tests.conftest import RUN_RECBOLE, TINY, evaluate_checkpoint, logged_result
from tests.ranks import RUN_TIMEOUT, free_port, rank_layout, run_ranks

# An epoch in seconds: ml-100k's users with fewer than 50 interactions (375 of 943, an odd number,
# so that over 2 processes RecBole's padded DistributedSampler would count one user twice),
# histories of 10, evaluation in batches of 32 users per process.
DDP_TINY = {**TINY, "MAX_ITEM_LIST_LENGTH": 10, "user_inter_num_interval": "[0,50)",
            "eval_batch_size": 64, "epochs": 1}


def launch(tmp_path, model, *flag_sets):
    """Start one run_recbole per flag set (as on separate machines) in ``tmp_path``; wait for all.

    Returns each launch's (exit status, output). Any launch still running after RUN_TIMEOUT is
    killed and the test fails.
    """
    options = {"model": model, "dataset": "ml-100k", **DDP_TINY,
               "checkpoint_dir": str(tmp_path / "saved")}
    launches = []
    for index, flags in enumerate(flag_sets):
        output = open(tmp_path / f"launch{index}.txt", "w+")
        command = [RUN_RECBOLE, *(f"--{key}={value}" for key, value in {**options, **flags}.items())]
        process = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
        launches.append((process, output))
    try:
        for process, _ in launches:
            process.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a multi-process run did not finish within {RUN_TIMEOUT} s (a hang)")
    finally:
        for process, _ in launches:
            process.kill()
    results = []
    for process, output in launches:
        output.seek(0)
        results.append((process.returncode, output.read()))
        output.close()
    return results


def assert_one_file_of_each(tmp_path, model):
    """Rank 0 alone wrote the checkpoint, the log file and the TensorBoard events; returns the
    checkpoint."""
    checkpoint, = glob.glob(str(tmp_path / "saved" / f"{model}-*.pth"))
    assert len(glob.glob(str(tmp_path / "log" / model / "*.log"))) == 1
    assert len(os.listdir(tmp_path / "log_tensorboard")) == 1
    return checkpoint


def assert_metrics_of_one_process(output, checkpoint):
    """The logged validation and test metrics are those of the saved weights evaluated in one
    process: every user counted once."""
    dataset, valid_result, test_result = evaluate_checkpoint(checkpoint)
    assert (dataset.user_num - 1) % 2 == 1  # what makes a padded split over 2 processes differ
    assert logged_result(output, "best valid") == valid_result
    assert logged_result(output, "test result") == test_result
    assert 0 < test_result["ndcg@10"] <= test_result["hit@10"] <= 1


@pytest.mark.parametrize("model,options", [
    ("Mamba2Rec", {}),
    ("SASRec", {"train_neg_sample_args": None}),  # RecBole 1.2.1 requires it with the CE loss
])
def test_two_processes(tmp_path, model, options):
    """--nproc 2 on a CPU: train, validate and test with gloo. mp.spawn returns only when both
    processes exited 0 (the command exits 1 otherwise)."""
    (status, output), = launch(tmp_path, model, {"nproc": 2, "port": free_port(), **options})
    assert status == 0, output[-5000:]
    checkpoint = assert_one_file_of_each(tmp_path, model)
    assert_metrics_of_one_process(output, checkpoint)


def test_two_machines_on_localhost(tmp_path):
    """Two launches, one process each, as ranks 0 and 1 of a 2-process run over 2 "machines".

    Without shuffling and dropout the two train as one process does: each takes half of every
    batch (even and odd samples) and their gradients are averaged, so the weights agree with a
    single-process run's to float rounding.
    """
    alike = {"shuffle": False, "dropout_prob": 0}
    machine = {"nproc": 1, "world_size": 2, "ip": "127.0.0.1", "port": free_port(), **alike}
    (status0, output0), (status1, output1) = launch(
        tmp_path, "Mamba2Rec", {**machine, "group_offset": 0}, {**machine, "group_offset": 1})
    assert (status0, status1) == (0, 0), output0[-3000:] + output1[-3000:]
    assert "test result" not in output1  # rank 1 logs errors only
    checkpoint = assert_one_file_of_each(tmp_path, "Mamba2Rec")
    assert_metrics_of_one_process(output0, checkpoint)

    run_recbole(model="Mamba2Rec", dataset="ml-100k",
                config_dict={**DDP_TINY, **alike, "checkpoint_dir": str(tmp_path / "one")})
    one_process, = glob.glob(str(tmp_path / "one" / "Mamba2Rec-*.pth"))
    one_process_weights = compat.load_checkpoint(one_process)["state_dict"]
    for name, weights in compat.load_checkpoint(checkpoint)["state_dict"].items():
        torch.testing.assert_close(weights, one_process_weights[name], rtol=1e-5, atol=1e-5)


def test_failure_on_one_machine_ends_the_other(tmp_path):
    """Rank 1's machine cannot load its dataset: it fails with RecBole's error, and rank 0, left
    alone, fails too instead of waiting forever."""
    machine = {"nproc": 1, "world_size": 2, "ip": "127.0.0.1", "port": free_port()}
    (status0, output0), (status1, output1) = launch(
        tmp_path, "Mamba2Rec", {**machine, "group_offset": 0},
        {**machine, "group_offset": 1, "dataset": "ml-missing"})
    assert status1 == 1 and "nor [ml-missing] a known dataset name" in output1, output1[-3000:]
    assert status0 == 1, output0[-3000:]
    assert "run_recbole: error: the run failed" in output0
    assert not glob.glob(str(tmp_path / "saved" / "*.pth"))


def test_spawned_processes_start_in_recbole_ssm():
    """RecBole's run() spawns run_recboles: a spawned process unpickles it from our module, so it
    imports recbole_ssm (our models, the fixes) even when spawned from an interactive session."""
    from recbole.quick_start import quick_start

    assert b"recbole_ssm.compat" in pickle.dumps(quick_start.run_recboles)


def test_world_size_smaller_than_nproc(capsys):
    assert main(["--model=Mamba2Rec", "--nproc=2", "--world_size=1"]) == 2
    error = capsys.readouterr().err
    assert "run_recbole: error: world_size=1 is too small" in error
    assert "ranks 0 to 1" in error


def test_refused_setting_before_any_process_starts(capsys):
    """As in a single-process run: one line naming the setting, exit status 2."""
    assert main(["--model=Mamba2Rec", "--nproc=2", "--num_layers=0"]) == 2
    assert capsys.readouterr().err == ("run_recbole: error: num_layers = 0 (type int) is not "
                                       "allowed: expected an integer >= 1\n")


def test_ranks_beyond_world_size(capsys):
    assert main(["--model=Mamba2Rec", "--nproc=2", "--world_size=2", "--group_offset=1"]) == 2
    assert "ranks 1 to 2" in capsys.readouterr().err


@pytest.fixture
def busy_port():
    """A port that a socket on this machine listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_port_in_use(capsys, busy_port):
    """Refused before any process starts."""
    assert main(["--model=Mamba2Rec", "--nproc=2", f"--port={busy_port}"]) == 2
    assert f"port {busy_port} is already in use on this machine" in capsys.readouterr().err


def test_join_port_in_use(busy_port):
    """Where the port is taken between the launcher's check and rank 0's start."""
    with pytest.raises(compat.DistributedSetupError, match=f"port {busy_port} is already in use"):
        compat.join_process_group("gloo", 0, 2, "127.0.0.1", busy_port, timeout=5)
    assert not torch.distributed.is_initialized()


def test_a_joined_process_leaves_its_group_at_exit(monkeypatch):
    """A gloo process that exits in its process group can die of SIGABRT in the interpreter's
    shutdown: joining registers the exit handler that leaves it."""
    at_exit = []
    monkeypatch.setattr(compat.atexit, "register", at_exit.append)
    compat.join_process_group("gloo", 0, 1, "127.0.0.1", free_port(), timeout=10)
    assert torch.distributed.is_initialized() and at_exit == [compat.leave_process_group]
    at_exit[0]()
    assert not torch.distributed.is_initialized()
    at_exit[0]()  # after the run left it on its own: nothing to do


@pytest.mark.parametrize("rank", [0, 1])
def test_join_alone_times_out(rank):
    """A rank whose partner never starts gets an error after ddp_timeout, not a hang."""
    with pytest.raises(compat.DistributedSetupError, match="not all 2 processes joined in time"):
        compat.join_process_group("gloo", rank, 2, "127.0.0.1", free_port(), timeout=2)


def test_more_processes_than_gpus(monkeypatch):
    """Checked before any GPU is touched (simulated: this machine has no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(compat.DistributedSetupError,
                       match="nproc=2 processes need one GPU each, and gpu_id='0' makes 1 visible"):
        Config(model="Mamba2Rec", dataset="ml-100k",
               config_dict={**rank_layout(0, free_port()), "gpu_id": "0"})


def test_backend_choice():
    assert compat.ddp_backend(None, on_gpu=False) == "gloo"
    assert compat.ddp_backend("GLOO", on_gpu=False) == "gloo"
    with pytest.raises(compat.DistributedSetupError, match="ddp_backend='nccl' runs on GPUs only"):
        compat.ddp_backend("nccl", on_gpu=False)
    with pytest.raises(compat.DistributedSetupError,
                       match=r"ddp_backend='tcp' is not available .*\(available: gloo"):
        compat.ddp_backend("tcp", on_gpu=False)


def test_rank_processes_share_cores_and_time_stamp(tmp_path, monkeypatch):
    """Without OMP_NUM_THREADS each of 2 CPU processes takes half the cores, not all of them, in
    PyTorch and in the compiled (Numba) kernels, which run in spawned processes; the trainer names
    the checkpoint after get_local_time(), and each rank gets rank 0's."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    (torch0, kernels0, time0), (torch1, kernels1, time1) = (
        written.split(" ", 2) for written in run_ranks(ranks.write_threads_and_time, tmp_path))
    assert [int(torch0), int(kernels0), int(torch1), int(kernels1)] == [half] * 4
    assert time0 == time1


@pytest.mark.parametrize("size", [0, 1, 2, 7, 375, 944])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_contiguous_shares(size, world_size):
    """Every index once, in order, shares within one of each other: no padding, no duplicates."""
    shares = [compat.contiguous_share(size, rank, world_size) for rank in range(world_size)]
    assert [index for share in shares for index in share] == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_fewer_evaluation_samples_than_processes(monkeypatch):
    """Refused: a process without any would skip the evaluation while the others wait for it."""
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    assert list(compat.ContiguousShardSampler(range(3))) == [0]
    with pytest.raises(ValueError, match="2 evaluation samples cannot be shared by 3 processes"):
        compat.ContiguousShardSampler(range(2))


def test_multi_process_config_unpickles_as_single_process(make_config):
    """What load_data_and_model needs to reload a checkpoint of a multi-process run."""
    config = make_config("Mamba2Rec")
    config.final_config_dict.update(single_spec=False, local_rank=1, world_size=2)
    unpickled = pickle.loads(pickle.dumps(config))
    assert unpickled["single_spec"] is True
    assert unpickled["model"] == "Mamba2Rec" and unpickled["world_size"] == 2


def test_dataset_download_in_one_process(tmp_path, monkeypatch):
    """RecBole issue #1989: downloading a dataset called barrier() without a process group."""
    monkeypatch.setattr(dataset_module, "decide_download", lambda url: True)
    monkeypatch.setattr(dataset_module, "download_url", ranks.serve_ml100k_as_ml1m)
    assert create_dataset(ranks.downloading_config(tmp_path)).inter_num == 100_000
    assert os.listdir(tmp_path / "ml-1m") == ["ml-1m.inter"]


def test_dataset_download_in_two_processes(tmp_path):
    """Rank 0 downloads; rank 1 waits for the whole dataset instead of loading a partial folder."""
    assert run_ranks(ranks.download_and_load, tmp_path) == ["100000", "100000"]
    assert (tmp_path / "downloads").read_text() == "rank 0\n"
