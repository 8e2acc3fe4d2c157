"""``recbole_ssm_replay``: replay a dataset's interactions, in timestamp order, through the streaming
states of a trained Mamba4Rec or Mamba2Rec, as live traffic would arrive.

    recbole_ssm_replay saved/Mamba4Rec-Jan-01-2025_12-00-00.pth
    python -m recbole_ssm.replay CHECKPOINT --batch-size 256 --json replay.json --save-states states.pt

The checkpoint is one that RecBole's trainer saved; its config rebuilds the dataset (filtering and
split as in training). Every interaction becomes one event of a
:class:`~recbole_ssm.serving.StateStore`; just before each event, the rank that the user's state gave
to the item that then came is recorded (among all items but RecBole's padding, as RecBole's
full-ranking evaluation of sequential models; ``--exclude-seen`` leaves out the user's earlier items).
Reported: HR@10, NDCG@10 and MRR@10 over the test part of RecBole's split (each user's last events)
and over every event that had a history, events per second, and per-event latency (median, p99).

Where a test event's history is longer than ``MAX_ITEM_LIST_LENGTH`` RecBole's evaluation sees only its
last ``MAX_ITEM_LIST_LENGTH`` items, the streamed state all of them; elsewhere the two compute the same
scores (the count of such events is reported).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import recbole_ssm
from recbole_ssm import compat, registry
from recbole_ssm.models.base import SSMSequentialRecommender
from recbole_ssm.modules.streaming import CausalStreaming
from recbole_ssm.serving import StateStore

TOP_K = 10


class ReplayError(Exception):
    """Something about the checkpoint or its dataset that the replay cannot work with."""


def streaming_models():
    """Our models with a causal block, which stream."""
    return [name for name in registry.model_names()
            if issubclass(getattr(recbole_ssm, name).mixer_class, CausalStreaming)]


def read_checkpoint(path):
    """RecBole's checkpoint dict at ``path`` (loaded with :func:`recbole_ssm.compat.load_checkpoint`) and
    its model class; a :class:`ReplayError` that says what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"no checkpoint file at {path}")
    try:
        checkpoint = compat.load_checkpoint(path, map_location="cpu")
    except compat.UnsafeCheckpointError as error:
        raise ReplayError(f"{path}: {error}") from error
    except Exception as error:
        raise ReplayError(f"{path} is not a RecBole checkpoint: torch.load failed "
                          f"({type(error).__name__}: {error})") from error
    from recbole.config import Config

    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), Config) \
            or not isinstance(checkpoint.get("state_dict"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ReplayError(f"{path} is not a RecBole checkpoint: expected a dict with a RecBole 'config' and a "
                          f"'state_dict', as RecBole's trainer saves; found {found}")
    name = checkpoint["config"]["model"]
    from recbole_ssm.cli import check_model

    try:
        check_model(name)
    except ValueError as error:
        raise ReplayError(f"{path}: {error}") from None
    from recbole.utils import get_model

    model_class = get_model(name)
    streaming = streaming_models()
    if not issubclass(model_class, SSMSequentialRecommender):
        raise ReplayError(f"{path} is a {name} checkpoint; the replay streams {' and '.join(streaming)}, "
                          f"which keep a fixed-size state per user. Evaluate {name} with RecBole instead.")
    if name not in streaming:
        reason = getattr(model_class.mixer_class, "streaming_unsupported", None) or "it has no streaming state"
        raise ReplayError(f"{path} is a {name} checkpoint, which cannot stream: {reason}")
    return checkpoint, model_class


def event_stream(dataset):
    """(user ids, item ids, timestamps) of all the dataset's interactions after RecBole's filtering, in
    the timestamp order of RecBole's own sorts: on the timestamps as RecBole holds them (float32, which
    ties unix times within a minute or so), ties in the dataset's order. That order decides which
    events RecBole's split tests, so it is taken exactly."""
    import pandas as pd

    frame = dataset.inter_feat
    fields = [dataset.uid_field, dataset.iid_field, dataset.time_field]
    if not isinstance(frame, pd.DataFrame) or None in fields or not set(fields) <= set(frame.columns):
        raise ReplayError("the replay needs the dataset's interactions with user, item and time fields, "
                          f"before RecBole splits them; found fields {fields}")
    interactions = dataset._dataframe_to_interaction(frame[fields])   # RecBole's tensors, its float32 times
    users, items, times = (interactions[field].numpy() for field in fields)
    order = np.argsort(times, kind="stable")
    return users[order], items[order], times[order]


def positions_by_user(users):
    """{user id: its positions in ``users``, in order}."""
    order = np.argsort(users, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(users[order])) + 1) if len(users) else []
    return {users[group[0]]: group for group in groups}


def test_positions(items, by_user, test_dataset):
    """Positions in the event stream of the test part of RecBole's split. RecBole orders sequential
    datasets by time (eval_args order TO), so every split of them (LS, RS, TS) tests each user's last
    events; that is checked against the test set's items."""
    test_users = test_dataset.inter_feat[test_dataset.uid_field].numpy()
    test_items = test_dataset.inter_feat[test_dataset.iid_field].numpy()
    wanted = {}
    for user, item in zip(test_users.tolist(), test_items.tolist()):
        wanted.setdefault(user, []).append(item)
    positions = []
    for user, user_items in wanted.items():
        stream = by_user.get(user, np.zeros(0, dtype=np.int64))[-len(user_items):]
        if len(stream) < len(user_items) or not np.array_equal(items[stream], user_items):
            raise ReplayError(f"RecBole's test items of user id {user} are not that user's last events in "
                              "timestamp order; the dataset differs from the one the split was made on")
        positions.extend(stream.tolist())
    return np.sort(np.array(positions, dtype=np.int64))


def ranking_metrics(ranks, k=TOP_K):
    """HR@k, NDCG@k and MRR@k of one held-out item per event, from its ranks (1 = top)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks <= k
    return {f"hit@{k}": float(hit.mean()),
            f"ndcg@{k}": float(np.where(hit, 1 / np.log2(ranks + 1), 0).mean()),
            f"mrr@{k}": float(np.where(hit, 1 / ranks, 0).mean())}


def replay(store, user_tokens, item_tokens, batch_size, exclude_seen=False, progress=True):
    """Observe the events in order, ``batch_size`` at a time. Returns the ranks (0 where the user had no
    history), each event's latency (seconds of the call that processed it) and the total seconds."""
    from tqdm import tqdm

    count = len(user_tokens)
    ranks = np.zeros(count, dtype=np.int64)
    latencies = np.zeros(count)
    with tqdm(total=count, unit="event", disable=not progress, file=sys.stderr, mininterval=1) as bar:
        start = time.perf_counter()
        for begin in range(0, count, batch_size):
            end = min(begin + batch_size, count)
            call = time.perf_counter()
            ranks[begin:end] = store.observe(user_tokens[begin:end], item_tokens[begin:end], return_ranks=True,
                                             exclude_seen=exclude_seen).numpy()
            latencies[begin:end] = time.perf_counter() - call
            bar.update(end - begin)
        total = time.perf_counter() - start
    return ranks, latencies, total


def load(checkpoint_path, device="cpu"):
    """The checkpoint's config, its model (evaluation mode, on ``device``), its dataset and RecBole's
    test set, built as RecBole's ``load_data_and_model`` does, and the event stream (:func:`event_stream`)."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    checkpoint, model_class = read_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    config["device"] = torch.device(device)
    config["use_gpu"] = torch.device(device).type == "cuda"
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    events = event_stream(dataset)  # before data_preparation, which turns the interactions into sequences
    train_data, _, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(device)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ReplayError(f"{checkpoint_path}: its weights do not fit the {config['model']} that its config "
                          f"builds: {error}") from error
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model.eval(), dataset, test_data._dataset, events


def run(checkpoint_path, batch_size=1, device="cpu", exclude_seen=False, save_states=None, progress=True):
    """Load, replay, measure; the report as a dict."""
    config, model, dataset, test_dataset, (users, items, _) = load(checkpoint_path, device)
    by_user = positions_by_user(users)
    tests = test_positions(items, by_user, test_dataset)
    earlier = np.zeros(len(users), dtype=np.int64)  # the same user's events before each event
    for positions in by_user.values():
        earlier[positions] = np.arange(len(positions))

    store = StateStore.for_dataset(model, dataset, capacity=len(by_user), remember_seen=exclude_seen)
    user_tokens = dataset.field2id_token[dataset.uid_field][users]
    item_tokens = dataset.field2id_token[dataset.iid_field][items]
    ranks, latencies, seconds = replay(store, user_tokens, item_tokens, batch_size, exclude_seen, progress)
    if save_states:
        store.save(save_states)
    predicted = ranks > 0
    return {
        "checkpoint": str(checkpoint_path),
        "model": config["model"],
        "dataset": config["dataset"],
        "events": len(users),
        "users": len(store),
        "batch_size": batch_size,
        "exclude_seen": exclude_seen,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "test": {"events": len(tests), **ranking_metrics(ranks[tests])},
        "test_events_longer_than_max_item_list_length": int((earlier[tests] > config["MAX_ITEM_LIST_LENGTH"]).sum()),
        "max_item_list_length": config["MAX_ITEM_LIST_LENGTH"],
        "all_events_with_history": {"events": int(predicted.sum()), **ranking_metrics(ranks[predicted])},
        "seconds": seconds,
        "events_per_second": len(users) / seconds,
        "latency_ms": {"median": float(np.median(latencies) * 1e3),
                       "p99": float(np.percentile(latencies, 99) * 1e3)},
        "memory_per_user_bytes": store.memory_per_user(),
        "saved_states": str(save_states) if save_states else None,
    }


def format_report(report):
    test, every = report["test"], report["all_events_with_history"]

    def metrics(values):
        return "  ".join(f"{name.upper().replace('HIT', 'HR')} {values[name]:.4f}" for name in
                         (f"hit@{TOP_K}", f"ndcg@{TOP_K}", f"mrr@{TOP_K}"))

    memory = report["memory_per_user_bytes"]
    lines = [
        f"{report['model']} on {report['dataset']}: {report['events']:,} events of {report['users']:,} users, "
        f"batches of {report['batch_size']}, {report['device']}, {report['torch_threads']} torch thread(s)",
        f"test part ({test['events']:,} events): {metrics(test)}",
        f"every event with a history ({every['events']:,}): {metrics(every)}",
        f"{report['events_per_second']:,.0f} events/s; latency per event: median "
        f"{report['latency_ms']['median']:.3f} ms, p99 {report['latency_ms']['p99']:.3f} ms "
        f"(the time of the call that processed it)",
        f"memory per user: {memory['total']:,} bytes ({memory['state']:,} of model state)",
    ]
    if report["test_events_longer_than_max_item_list_length"]:
        lines.append(f"{report['test_events_longer_than_max_item_list_length']:,} test events have a history "
                     f"longer than MAX_ITEM_LIST_LENGTH = {report['max_item_list_length']}: RecBole's "
                     "evaluation truncates those, the streamed states do not")
    if report["saved_states"]:
        lines.append(f"states saved to {report['saved_states']}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="recbole_ssm_replay", description=__doc__.split("\n\n")[0],
        epilog="Latency: each event counts the time of the store call that processed it, so with "
               "--batch-size above 1 it is the latency of a whole batch.")
    parser.add_argument("checkpoint", help="a .pth file saved by RecBole's trainer (Mamba4Rec or Mamba2Rec)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="events per store call, in timestamp order (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--exclude-seen", action="store_true",
                        help="rank among the items the user has not seen yet (RecBole's sequential "
                             "evaluation ranks among all items)")
    parser.add_argument("--save-states", type=Path, metavar="PATH", help="save the store's states here at the end")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("recbole_ssm_replay: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run(args.checkpoint, args.batch_size, args.device, args.exclude_seen, args.save_states,
                     progress=not args.no_progress)
    except ReplayError as error:
        print(f"recbole_ssm_replay: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
