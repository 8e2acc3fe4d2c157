"""Interactions held compactly in memory, then de-duplicated, k-core filtered, sorted and written.

Shared by the converters. User and item ids are interned (each distinct id string stored once,
mapped to an int); each interaction costs 24 bytes in typed arrays (int32 user, int32 item,
int64 timestamp, float64 rating), whatever the size of the review it came from.
"""
from array import array
from dataclasses import dataclass, field

import numpy as np

from .atomic import BadLinePolicy, ConversionError, Field, as_float

INTER_FIELDS = (
    Field("user_id", "token"),
    Field("item_id", "token"),
    Field("rating", "float"),
    Field("timestamp", "float"),
)

_WRITE_CHUNK = 100_000


@dataclass
class InteractionStats:
    """What happened to the interactions between reading and writing."""

    read: int = 0
    duplicates: int = 0
    kcore: int = None  # K, or None when not applied
    kcore_rounds: int = 0
    removed_by_kcore: int = 0
    written: int = 0
    users: int = 0
    items: int = 0


@dataclass
class ConversionReport:
    """Outcome of one conversion: files written, interaction statistics, what the policies did."""

    directory: str
    rows: dict  # file name -> rows written (header excluded)
    stats: InteractionStats
    policy: BadLinePolicy  # skipped and repaired lines per input path
    features: dict = field(default_factory=dict)  # feature input path -> FeatureStats
    stale_removed: list = field(default_factory=list)  # temporary files of killed runs, removed

    @property
    def skipped_lines(self):
        """Input path -> malformed lines skipped (with --skip-bad-lines)."""
        return dict(self.policy.skipped)

    @property
    def warnings(self):
        """What the user should know although the conversion succeeded."""
        return [
            f"{f.missing:,} of the {f.expected:,} {f.kind} of the written interactions have no "
            f"line in {path}: they are written without features"
            for path, f in self.features.items()
            if f.missing
        ]

    def summary(self):
        """Human-readable multi-line summary."""
        s = self.stats
        lines = [f"wrote {self.directory}"]
        lines += [f"  {name}: {rows:,} rows" for name, rows in self.rows.items()]
        lines.append(f"interactions read: {s.read:,}")
        lines.append(f"exact duplicates removed (same user, item, timestamp): {s.duplicates:,}")
        if s.kcore is None:
            lines.append("k-core filter: not applied")
        else:
            lines.append(
                f"{s.kcore}-core filter: {s.removed_by_kcore:,} interactions removed "
                f"in {s.kcore_rounds} round(s)"
            )
        lines.append(f"interactions written: {s.written:,} ({s.users:,} users, {s.items:,} items)")
        if self.policy.skip:
            lines += [f"bad lines skipped in {path}: {n:,}" for path, n in self.policy.skipped.items()]
        lines += [
            f"lines repaired in {path}: {n:,} (first: {self.policy.first_repair[path]})"
            for path, n in self.policy.repaired.items()
        ]
        for path, f in self.features.items():
            if f.repeated:
                lines.append(f"repeated ids in {path}: {f.repeated:,} (first row kept)")
            if f.emptied:
                lines.append(f"values that RecBole reads as missing (NA, null, ...) in {path}, "
                             f"written empty: {f.emptied:,}")
        if self.stale_removed:
            lines.append(f"temporary files of interrupted earlier runs removed: {len(self.stale_removed)}")
        return "\n".join(lines)


def first_occurrences(users, items, times):
    """Boolean mask keeping the first of each group of rows with equal (user, item, time)."""
    n = len(users)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    order = np.lexsort((np.arange(n), times, items, users))
    u, i, t = users[order], items[order], times[order]
    repeat = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    keep[order[1:][repeat]] = False
    return keep


def kcore_mask(users, items, k):
    """Iterative k-core: boolean mask of the rows left once every remaining user and item has
    at least ``k`` rows, removing rows and recounting until nothing changes.
    Returns (mask, rounds), rounds counting the passes that removed something."""
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    n_users = int(users.max()) + 1 if len(users) else 0
    n_items = int(items.max()) + 1 if len(items) else 0
    while True:
        user_count = np.bincount(users[keep], minlength=n_users)
        item_count = np.bincount(items[keep], minlength=n_items)
        enough = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if np.array_equal(enough, keep):
            return keep, rounds
        keep = enough
        rounds += 1


class InteractionLog:
    """Interactions collected while streaming an input; ``finish`` then ``write``.

    ``time_units_per_second`` is 1 for timestamps in seconds, 1000 for milliseconds; the written
    timestamp is always in seconds (milliseconds kept as decimals, so order is never lost).
    """

    def __init__(self, time_units_per_second=1):
        self.time_units_per_second = time_units_per_second
        self.user_index = {}
        self.item_index = {}
        self._users = array("i")
        self._items = array("i")
        self._times = array("q")
        self._ratings = array("d")
        self._rows = None
        self._user_present = None
        self._item_present = None

    def add(self, user, item, rating, timestamp):
        """Record one interaction (ids are strings, ``timestamp`` an int in the log's unit)."""
        user_index = self.user_index.get(user)
        if user_index is None:
            user_index = self.user_index[user] = len(self.user_index)
        item_index = self.item_index.get(item)
        if item_index is None:
            item_index = self.item_index[item] = len(self.item_index)
        self._users.append(user_index)
        self._items.append(item_index)
        self._times.append(timestamp)
        self._ratings.append(rating)

    def finish(self, source, kcore=None):
        """Drop exact duplicates (same user, item, timestamp: the first one read is kept), apply
        the k-core filter if ``kcore``, and sort by user (in order of first appearance in the
        input), then timestamp, then input order. Returns ``InteractionStats``; an error if
        nothing is left (``source`` names the input in the message)."""
        if len(self._users) == 0:
            raise ConversionError(f"no interactions read from {source}")
        users = np.array(self._users, dtype=np.int32)
        items = np.array(self._items, dtype=np.int32)
        times = np.array(self._times, dtype=np.int64)
        ratings = np.array(self._ratings, dtype=np.float64)
        self._users = self._items = self._times = self._ratings = None
        stats = InteractionStats(read=len(users), kcore=kcore)

        keep = first_occurrences(users, items, times)
        stats.duplicates = int((~keep).sum())
        users, items, times, ratings = users[keep], items[keep], times[keep], ratings[keep]

        if kcore is not None:
            keep, stats.kcore_rounds = kcore_mask(users, items, kcore)
            stats.removed_by_kcore = int((~keep).sum())
            users, items, times, ratings = users[keep], items[keep], times[keep], ratings[keep]
            if len(users) == 0:
                raise ConversionError(
                    f"the {kcore}-core filter removed all {stats.read - stats.duplicates:,} "
                    f"interactions of {source}"
                )

        order = np.lexsort((times, users))  # stable: ties keep input order
        self._rows = (users[order], items[order], ratings[order], times[order])
        self._user_present = np.zeros(len(self.user_index), dtype=bool)
        self._user_present[users] = True
        self._item_present = np.zeros(len(self.item_index), dtype=bool)
        self._item_present[items] = True
        stats.written = len(users)
        stats.users = int(self._user_present.sum())
        stats.items = int(self._item_present.sum())
        return stats

    def has_user(self, user):
        """Whether ``user`` is in the finished (written) interactions."""
        index = self.user_index.get(user)
        return index is not None and bool(self._user_present[index])

    def has_item(self, item):
        """Whether ``item`` is in the finished (written) interactions."""
        index = self.item_index.get(item)
        return index is not None and bool(self._item_present[index])

    def _format_time(self, value):
        if self.time_units_per_second == 1:
            return str(value)
        return repr(value / self.time_units_per_second)

    def write(self, output, filename):
        """Write the finished interactions as ``filename`` in an ``AtomicOutput``."""
        writer = output.open(filename, INTER_FIELDS)
        user_names = list(self.user_index)  # dicts keep insertion order: position = index
        item_names = list(self.item_index)
        users, items, ratings, times = self._rows
        rating_text = {value: as_float(value) for value in np.unique(ratings).tolist()}
        format_time = self._format_time
        for start in range(0, len(users), _WRITE_CHUNK):
            stop = start + _WRITE_CHUNK
            for user, item, rating, time in zip(
                users[start:stop].tolist(),
                items[start:stop].tolist(),
                ratings[start:stop].tolist(),
                times[start:stop].tolist(),
            ):
                writer.write(
                    (user_names[user], item_names[item], rating_text[rating], format_time(time))
                )
        return writer.rows
