"""``run_recbole``: RecBole's ``run_recbole.py`` with our models registered.

Same flags as RecBole's script (--model, --dataset, --config_files, --nproc, --ip, --port,
--world_size, --group_offset); any other ``--key=value`` is a RecBole config override, read by
RecBole's ``Config`` from the command line as usual.

With ``--nproc N`` (and, over several machines, ``--world_size`` / ``--group_offset``) the run
spawns N processes on this machine through RecBole's DDP, fixed by :mod:`recbole_ssm.compat`
(fix 9): gloo on CPUs, nccl on GPUs. If one process fails, the others are stopped and the command
exits 1.
"""
import argparse
import socket
import sys

import recbole_ssm  # noqa: F401  (registers our models with RecBole)
from recbole_ssm import compat, registry
from recbole_ssm.models.checks import RunCheckError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="run_recbole",
        description="Train and evaluate a RecBole model; recbole-ssm's models "
                    f"({', '.join(registry.model_names())}) and RecBole's built-in ones. "
                    "Other --key=value options override RecBole config keys.",
    )
    parser.add_argument("--model", "-m", default="Mamba4Rec", help="model name (default: Mamba4Rec)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", default=None, help="space-separated config files")
    parser.add_argument("--nproc", type=int, default=1, help="number of processes")
    parser.add_argument("--ip", default="localhost", help="the ip of the master node")
    parser.add_argument("--port", type=int, default=5678, help="the port of the master node")
    parser.add_argument("--world_size", type=int, default=-1, help="total number of jobs")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank offset of this group")
    return parser


def check_model(name):
    """Raise a RunCheckError (a ValueError) naming our models when RecBole cannot find ``name``."""
    from recbole.utils import get_model

    try:
        get_model(name)
    except (ValueError, ImportError):
        # RecBole's lookup of an unknown name also imports its exlib models, which fail with
        # ImportError when lightgbm / xgboost are not installed.
        raise RunCheckError(
            f"unknown model {name!r}: it is neither one of recbole-ssm's models "
            f"({', '.join(registry.model_names())}) nor a RecBole built-in model"
        ) from None


def check_port_free(port):
    """Raise DistributedSetupError if a process on this machine listens on ``port``, where rank 0
    will."""
    with socket.socket() as probe:
        # As PyTorch's store does: a port whose last connections are closing (TIME_WAIT) is usable.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise compat.DistributedSetupError(
                f"port {port} is already in use on this machine ({error.strerror}), and rank 0 "
                "listens there: choose a free one with --port") from None


class RunFailed(RuntimeError):
    """A process of a multi-process run failed; this machine's other processes were stopped."""


def run(args):
    """Run training and evaluation as RecBole's ``run_recbole.py`` does; returns RecBole's result dict
    (in a multi-process run, that of this machine's first process)."""
    from recbole.quick_start import run_recbole

    config_files = args.config_files.strip().split(" ") if args.config_files else None
    if args.nproc == 1 and args.world_size <= 0:
        return run_recbole(model=args.model, dataset=args.dataset, config_file_list=config_files)

    import torch.multiprocessing as mp
    from recbole.config import Config
    from torch.multiprocessing.spawn import ProcessException

    world_size = args.nproc if args.world_size == -1 else args.world_size
    compat.check_process_layout(args.nproc, world_size, args.group_offset)
    if args.group_offset == 0:
        check_port_free(args.port)
    # The settings checks (RunCheckError), here once rather than in a traceback from each process.
    Config(model=args.model, dataset=args.dataset, config_file_list=config_files)
    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = {"world_size": world_size, "ip": args.ip, "port": args.port,
                   "nproc": args.nproc, "offset": args.group_offset}
    kwargs = {"config_dict": config_dict, "queue": queue}
    try:
        mp.spawn(compat.run_recboles, args=(args.model, args.dataset, config_files, kwargs),
                 nprocs=args.nproc, join=True)
    except ProcessException as error:
        raise RunFailed(
            f"the run failed, and this machine's other processes were stopped.{error}") from None
    return None if queue.empty() else queue.get()


def main(argv=None):
    """Console entry point. ``argv`` defaults to ``sys.argv[1:]``, which RecBole also reads."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args, _ = build_parser().parse_known_args(sys.argv[1:])
    try:
        check_model(args.model)
        run(args)
    except (RunCheckError, compat.DistributedSetupError) as error:  # refused before any training
        return _failed(error, status=2)
    except RunFailed as error:
        return _failed(error, status=1)
    return 0


def _failed(error, status):
    print(f"run_recbole: error: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
