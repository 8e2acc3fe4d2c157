"""``run_recbole``: RecBole's ``run_recbole.py`` with our models registered.

Same flags as RecBole's script (--model, --dataset, --config_files, --nproc, --ip, --port,
--world_size, --group_offset); any other ``--key=value`` is a RecBole config override, read by
RecBole's ``Config`` from the command line as usual.
"""
import argparse
import sys

import recbole_ssm  # noqa: F401  (registers our models with RecBole)
from recbole_ssm import registry
from recbole_ssm.models.checks import RunCheckError


def _spawned_run(rank, *args):
    """Entry point of each process of a multi-process run: importing this module registered our models."""
    from recbole.quick_start import run_recboles

    run_recboles(rank, *args)


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
    parser.add_argument("--port", default="5678", help="the port of the master node")
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


def run(args):
    """Run training and evaluation as RecBole's ``run_recbole.py`` does; returns RecBole's result dict."""
    from recbole.quick_start import run_recbole

    config_files = args.config_files.strip().split(" ") if args.config_files else None
    if args.nproc == 1 and args.world_size <= 0:
        return run_recbole(model=args.model, dataset=args.dataset, config_file_list=config_files)

    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = {
        "world_size": args.nproc if args.world_size == -1 else args.world_size,
        "ip": args.ip, "port": args.port, "nproc": args.nproc, "offset": args.group_offset,
    }
    kwargs = {"config_dict": config_dict, "queue": queue}
    mp.spawn(_spawned_run, args=(args.model, args.dataset, config_files, kwargs),
             nprocs=args.nproc, join=True)
    return None if queue.empty() else queue.get()


def main(argv=None):
    """Console entry point. ``argv`` defaults to ``sys.argv[1:]``, which RecBole also reads."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args, _ = build_parser().parse_known_args(sys.argv[1:])
    try:
        check_model(args.model)
        run(args)
    except RunCheckError as error:  # a setting or dataset refused before any training
        print(f"run_recbole: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
