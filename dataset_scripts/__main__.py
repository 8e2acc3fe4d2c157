"""Command line: ``python -m dataset_scripts {ml-1m,amazon2023} ...`` (see README.md)."""
import argparse
import signal
import sys
from contextlib import contextmanager

from .amazon2023 import convert_amazon2023
from .atomic import ConversionError, Progress
from .movielens import ML1M_ENCODINGS, convert_ml1m


class Stopped(BaseException):
    """A stop signal arrived; raised where the program is, so that partial output is removed on
    the way out, as for Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_signals_raise():
    """Within this block, SIGTERM and SIGHUP raise ``Stopped`` (unless they are ignored, as under
    ``nohup``; then they stay ignored)."""

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            previous[number] = signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_common_options(parser):
    parser.add_argument(
        "--output", required=True, metavar="OUT_DIR",
        help="output root; files go to OUT_DIR/<dataset>/<dataset>.inter etc. "
        "(point RecBole's data_path here)",
    )
    parser.add_argument(
        "--kcore", type=_positive_int, metavar="K",
        help="keep only users and items with at least K interactions, repeated until stable "
        "(default: no filtering; RecBole's user/item_inter_num_interval can do it instead)",
    )
    parser.add_argument(
        "--skip-bad-lines", action="store_true",
        help="skip malformed lines and report how many per file (default: stop at the first one)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m dataset_scripts",
        description="Convert raw datasets to RecBole atomic files.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ml1m = commands.add_parser(
        "ml-1m", help="MovieLens-1M: ratings.dat, movies.dat, users.dat",
        description="Write OUT_DIR/ml-1m/ml-1m.{inter,item,user} from the MovieLens-1M .dat files.",
    )
    ml1m.add_argument("--input", required=True, metavar="RAW_DIR",
                      help="directory holding ratings.dat, movies.dat and users.dat")
    ml1m.add_argument(
        "--encoding", choices=ML1M_ENCODINGS, default=ML1M_ENCODINGS[0],
        help="encoding of the .dat files (default: latin-1, as published); a file that starts with "
        "a UTF-8 byte order mark is read as UTF-8 anyway",
    )
    _add_common_options(ml1m)
    ml1m.set_defaults(
        run=lambda args, progress: convert_ml1m(
            args.input, args.output, kcore=args.kcore, skip_bad_lines=args.skip_bad_lines,
            progress=progress, encoding=args.encoding,
        )
    )

    amazon = commands.add_parser(
        "amazon2023", help="Amazon Reviews'23: review file and optional meta file",
        description="Write OUT_DIR/NAME/NAME.inter (and NAME.item with --meta) from an "
        "Amazon Reviews'23 category.",
    )
    amazon.add_argument(
        "--reviews", required=True, metavar="FILE",
        help="review file, .jsonl or .jsonl.gz (e.g. Beauty_and_Personal_Care.jsonl.gz)",
    )
    amazon.add_argument(
        "--meta", metavar="FILE",
        help="item metadata file, .jsonl or .jsonl.gz (e.g. meta_Beauty_and_Personal_Care.jsonl.gz); "
        "without it no .item file is written",
    )
    amazon.add_argument("--name", required=True,
                        help="dataset name, e.g. amazon-beauty or amazon-video-games")
    _add_common_options(amazon)
    amazon.set_defaults(
        run=lambda args, progress: convert_amazon2023(
            args.reviews, args.output, args.name, meta=args.meta, kcore=args.kcore,
            skip_bad_lines=args.skip_bad_lines, progress=progress,
        )
    )
    return parser


def main(argv=None):
    """Run the command line; returns the exit status (0 success, 1 conversion error, 128 + the
    signal's number when stopped by a signal)."""
    args = build_parser().parse_args(argv)
    try:
        with stop_signals_raise():
            report = args.run(args, Progress(quiet=args.quiet))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. disk full while writing; partial output already removed
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no partial output left", file=sys.stderr)
        return 128 + signal.SIGINT
    except Stopped as stop:
        print(f"stopped by {signal.Signals(stop.signum).name}; no partial output left",
              file=sys.stderr)
        return 128 + stop.signum
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
