"""Shared machinery for writing RecBole atomic files.

Used by every converter:
  - ``Field``: a (name, type) pair, written in the header as ``name:type``;
  - value cleaning, so that every written value is safe for RecBole's tab-separated reader;
  - ``AtomicOutput``: files written under temporary names, renamed into place only on success;
  - ``read_records``: streaming line reader (plain or gzip, in a given encoding, a UTF-8 BOM
    honoured) with progress on stderr and the bad-line policy (stop with file and line number, or
    skip and count).
"""
import codecs
import gzip
import math
import os
import re
import signal
import sys
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


class ConversionError(Exception):
    """A problem that stops the conversion; its text is the one-line message shown to the user."""


class BadLine(Exception):
    """Raised by a line parser: this line is malformed (the text says why)."""


class Repaired(NamedTuple):
    """Returned by a line parser for a line it kept after changing something (``reason`` says what)."""

    record: tuple
    reason: str


@dataclass(frozen=True)
class Field:
    """One column of an atomic file: RecBole field name and type (token, token_seq, float...)."""

    name: str
    type: str

    def __post_init__(self):
        if self.type not in FIELD_TYPES:
            raise ValueError(f"unknown RecBole field type {self.type!r}")

    @property
    def header(self):
        return f"{self.name}:{self.type}"


def header_line(fields):
    """The first line of an atomic file for these fields, without the newline."""
    return "\t".join(f.header for f in fields)


# Control characters (tab, newline, carriage return, NUL, C1 controls such as NEL) break lines
# or columns; a double quote at the start of a value would open a quoted field in pandas' CSV
# reader, which RecBole uses, and swallow the following lines.
_UNSAFE_CHARS = re.compile('[\x00-\x1f\x7f-\x9f]')
# A code point that UTF-8 cannot encode: half of a surrogate pair, alone (JSON's "\ud800").
_SURROGATE = re.compile('[\ud800-\udfff]')
REPLACEMENT_CHARACTER = "\ufffd"

# The values that pandas' CSV reader (RecBole's) reads as missing by default, as in pandas'
# ``_libs.parsers.STR_NA_VALUES``: an id equal to one of them would be dropped, another value
# would become missing.
NA_MARKERS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


def unpaired_surrogate(text):
    """The first unpaired surrogate in ``text`` (which UTF-8 cannot encode), or None."""
    match = _SURROGATE.search(text)
    return match.group() if match else None


def clean_text(value):
    """A value as one line of text, safe as a ``token`` and, split at spaces, as a ``token_seq``
    of words: control characters become spaces, double quotes become single quotes, runs of
    whitespace become one space, no leading/trailing space, and an unpaired surrogate (which UTF-8
    cannot encode) becomes U+FFFD. ``None`` becomes ""."""
    if value is None:
        return ""
    text = _UNSAFE_CHARS.sub(" ", str(value)).replace('"', "'")
    return " ".join(_SURROGATE.sub(REPLACEMENT_CHARACTER, text).split())


def parse_id(value, name):
    """An id written exactly as read (a string, or a JSON integer); ``BadLine`` when it is missing,
    or when RecBole would not read it back as the same id: empty or a pandas NA marker (dropped as
    missing), or holding what an atomic file cannot keep (control characters, double quotes,
    leading, trailing or repeated spaces, unpaired surrogates)."""
    if value is None:
        raise BadLine(f"missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadLine(f"field {name!r} is not a string: {value!r}")
    text = str(value)
    if text in NA_MARKERS:
        raise BadLine(f"empty field {name!r}" if not text else
                      f"{name} {text!r} would be read by RecBole (pandas) as a missing value")
    surrogate = unpaired_surrogate(text)
    if surrogate:
        raise BadLine(f"{name} {text!r} holds an unpaired surrogate ({surrogate!r}), which UTF-8 "
                      "cannot encode")
    if clean_text(text) != text:
        raise BadLine(f"{name} {text!r} holds characters an atomic file cannot keep as they are "
                      "(control characters, double quotes, leading, trailing or repeated spaces)")
    return text


def as_token_seq(values):
    """A ``token_seq`` value from a list of labels; spaces inside a label become ``_`` so that
    each label stays one token ("Hair Care" -> "Hair_Care"). Empty labels are dropped."""
    tokens = (clean_text(v).replace(" ", "_") for v in values)
    return " ".join(t for t in tokens if t)


def as_float(value):
    """A ``float`` value: repr of a finite number, or empty for a missing one."""
    if value is None:
        return ""
    value = float(value)
    if not math.isfinite(value):
        return ""
    return repr(value)


# Numbers as text: ASCII digits only, no digit-group underscores (which int() and float() accept).
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_number(value, name, minimum=-math.inf, maximum=math.inf):
    """A finite number in [minimum, maximum] from a JSON number or a numeric string (int kept as
    int); ``BadLine`` for anything else, naming the field."""
    if value is None:
        raise BadLine(f"missing field {name!r}")
    if isinstance(value, bool):
        raise BadLine(f"non-numeric {name} {value!r}")
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value):
        number = int(value)
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = float(value)
    else:
        raise BadLine(f"non-numeric {name} {value!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise BadLine(f"non-numeric {name} {value!r}")
    if not minimum <= number <= maximum:
        raise BadLine(f"{name} {value!r} is out of range ({minimum} to {maximum})")
    return number


def parse_integer(value, name, minimum=-(2**63), maximum=2**63 - 1):
    """Like ``parse_number`` but the value must be a whole number; returns an int."""
    number = parse_number(value, name)
    if isinstance(number, float):
        if not number.is_integer():
            raise BadLine(f"{name} {value!r} is not a whole number")
        number = int(number)
    if not minimum <= number <= maximum:
        raise BadLine(f"{name} {value!r} is out of range ({minimum} to {maximum})")
    return number


@dataclass
class FeatureStats:
    """What ``write_feature_rows`` wrote from one feature file, for the ``expected`` ids (``kind``,
    e.g. "items") of the written interactions."""

    kind: str
    expected: int
    rows: int = 0
    repeated: int = 0  # rows whose id had a row already (dropped: the first row read is kept)
    emptied: int = 0  # values equal to a pandas NA marker, written empty (RecBole reads them so)

    @property
    def missing(self):
        """Expected ids that got no row."""
        return self.expected - self.rows


def write_feature_rows(writer, rows, wanted, kind, expected):
    """Write the rows (tuples of formatted strings, id first) whose id satisfies ``wanted``,
    each id once (the first row read is kept); a value that pandas would read as missing
    (``NA_MARKERS``) is written empty, so that the file says what RecBole will see. Returns
    ``FeatureStats`` (``kind``, ``expected``: the number of ids that ``wanted`` accepts)."""
    seen = set()
    stats = FeatureStats(kind, expected)
    for row_id, *values in rows:
        if not wanted(row_id):
            continue
        if row_id in seen:
            stats.repeated += 1
            continue
        seen.add(row_id)
        emptied = sum(1 for value in values if value and value in NA_MARKERS)
        if emptied:
            stats.emptied += emptied
            values = ["" if value in NA_MARKERS else value for value in values]
        writer.write((row_id, *values))
    stats.rows = len(seen)
    return stats


class RowWriter:
    """Writes the rows of one atomic file (values already cleaned and formatted as strings)."""

    def __init__(self, handle, fields):
        self._handle = handle
        self._width = len(fields)
        self.rows = 0
        handle.write(header_line(fields) + "\n")

    def write(self, values):
        if len(values) != self._width:
            raise ValueError(f"row has {len(values)} values, header has {self._width}")
        self._handle.write("\t".join(values))
        self._handle.write("\n")
        self.rows += 1


class AtomicOutput:
    """The atomic files of one dataset directory, written all-or-nothing.

    Each file is written to a hidden temporary name in the target directory
    (``.<name>.tmp-<process id>``); when the ``with`` block ends without an exception, all are
    renamed to their final names (signals held back meanwhile, so that an interrupt never leaves
    half of them renamed), and the files named in ``replaces`` that this run did not write (left by
    an earlier run) are removed, so that the directory never mixes two runs. On an exception, the
    temporary files are deleted, and so are the directories this object created, leaving nothing
    behind. On entry, temporary files of ``replaces`` left by runs that were killed (their process
    is gone) are removed; ``stale_removed`` lists them.
    """

    def __init__(self, directory, replaces=()):
        self.directory = os.path.abspath(directory)
        self.replaces = tuple(replaces)
        self.written = []  # final paths, in the order they were opened
        self.stale_removed = []
        self._temporaries = []  # each one listed before it is created
        self._open = []  # (temporary path, final path, handle)
        self._created_dirs = []  # each one listed before it is created

    def __enter__(self):
        try:
            self._create_directory()
            self._remove_stale_temporaries()
        except BaseException:  # an interrupt included: __exit__ will not run
            self._remove_created_dirs()
            raise
        return self

    def _create_directory(self):
        missing = []
        path = self.directory
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            self._created_dirs.append(path)
            try:
                os.mkdir(path)
            except OSError as err:
                self._created_dirs.pop()
                raise ConversionError(f"cannot create output directory {path}: {err.strerror}")

    def _remove_stale_temporaries(self):
        """Remove ``.<name>.tmp-<pid>`` for the names in ``replaces`` whose process is gone (or is
        this one, which has opened none yet: a killed run's process id can come round again)."""
        ours = {f".{filename}.tmp-" for filename in self.replaces}
        for entry in sorted(os.listdir(self.directory)):
            prefix, _, pid = entry.rpartition(".tmp-")
            if f"{prefix}.tmp-" not in ours or not pid.isdigit():
                continue
            if int(pid) == os.getpid() or not process_exists(int(pid)):
                path = os.path.join(self.directory, entry)
                os.remove(path)
                self.stale_removed.append(path)

    def open(self, filename, fields):
        """Start writing ``filename`` (in the dataset directory) with this header."""
        final = os.path.join(self.directory, filename)
        temporary = os.path.join(self.directory, f".{filename}.tmp-{os.getpid()}")
        self._temporaries.append(temporary)
        handle = open(temporary, "w", encoding="utf-8", newline="\n")
        self._open.append((temporary, final, handle))
        return RowWriter(handle, fields)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            with signals_held():
                self._commit()
        else:
            self._discard()
        return False

    def _commit(self):
        for _, _, handle in self._open:
            handle.close()
        for temporary, final, _ in self._open:
            os.replace(temporary, final)
            self.written.append(final)
        for filename in self.replaces:
            path = os.path.join(self.directory, filename)
            if path not in self.written and os.path.exists(path):
                os.remove(path)

    def _discard(self):
        for _, _, handle in self._open:
            handle.close()
        for temporary in self._temporaries:
            if os.path.exists(temporary):
                os.remove(temporary)
        self._remove_created_dirs()

    def _remove_created_dirs(self):
        for path in reversed(self._created_dirs):
            try:
                os.rmdir(path)
            except OSError:
                pass


def process_exists(pid):
    """Whether a process with this id is running (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The signals that stop a conversion (the command line turns SIGTERM and SIGHUP into exceptions).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextmanager
def signals_held():
    """Within this block, the stop signals wait (where the platform can hold them back)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Progress:
    """Progress lines on stderr while reading a file: one every ``interval`` seconds, plus a
    final one. Silent when ``quiet``."""

    def __init__(self, quiet=False, interval=10.0, stream=None):
        self.quiet = quiet
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr

    def _say(self, text):
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def reading(self, path):
        """A per-file tracker: call ``tick(lines)`` often and ``done(lines)`` at the end."""
        return _FileProgress(self, path)

    def note(self, text):
        self._say(text)


class _FileProgress:
    def __init__(self, progress, path):
        self._progress = progress
        self._name = os.path.basename(path)
        self._start = self._last = time.monotonic()

    def tick(self, lines):
        now = time.monotonic()
        if now - self._last >= self._progress.interval:
            self._last = now
            rate = lines / max(now - self._start, 1e-9)
            self._progress._say(f"{self._name}: {lines:,} lines read ({rate:,.0f} lines/s)")

    def done(self, lines):
        elapsed = time.monotonic() - self._start
        rate = lines / max(elapsed, 1e-9)
        self._progress._say(
            f"{self._name}: {lines:,} lines read in {elapsed:.1f} s ({rate:,.0f} lines/s)"
        )


@dataclass
class BadLinePolicy:
    """What a malformed line does: stop the run (default) or, with ``skip``, be counted and
    skipped. ``skipped`` counts skipped lines per file, ``repaired`` the lines kept after a
    change (``first_repair`` says what the first one per file was); the first few of each are
    shown."""

    skip: bool = False
    progress: Progress = None
    shown_per_file: int = 3
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    first_repair: dict = field(default_factory=dict)

    def bad_line(self, path, line_number, reason):
        if not self.skip:
            raise ConversionError(
                f"{path}, line {line_number}: {reason} (use --skip-bad-lines to skip such lines)"
            )
        self.skipped[path] += 1
        self._show(self.skipped[path], f"skipping {path}, line {line_number}: {reason}")

    def repaired_line(self, path, line_number, reason):
        self.repaired[path] += 1
        self.first_repair.setdefault(path, f"line {line_number}: {reason}")
        self._show(self.repaired[path], f"repaired {path}, line {line_number}: {reason}")

    def _show(self, count, text):
        if self.progress is not None and count <= self.shown_per_file:
            self.progress.note(text)


def open_input(path):
    """Open an input file for binary line reading; ``.gz`` files are decompressed on the fly."""
    if not os.path.isfile(path):
        raise ConversionError(f"input file not found: {path}")
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as err:
        raise ConversionError(f"cannot open {path}: {err.strerror or err}")


def decode_line(raw, encoding):
    """``raw`` bytes as text, line end removed; ``BadLine`` naming the first byte that is not
    ``encoding``."""
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise BadLine(
            f"not valid {encoding}: byte 0x{raw[err.start]:02x} at column {err.start + 1}"
        ) from None


def read_records(path, parse_line, policy, progress, encoding):
    """Yield ``parse_line(text)`` for each non-blank line of ``path``, streaming.

    Lines are decoded from ``encoding``, except that a file starting with a UTF-8 byte order mark
    is UTF-8 (the mark itself is dropped; a note says so). ``parse_line`` raises ``BadLine`` for
    a malformed line, which ``policy`` turns into an error naming the file and the line number
    (1-based), or a skipped line; it returns ``Repaired`` for a line it kept after a change, which
    ``policy`` counts. A file that cannot be read to its end (e.g. truncated gzip) is always an
    error.
    """
    tracker = progress.reading(path)
    policy.skipped.setdefault(path, 0)
    line_number = 0
    with open_input(path) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as err:
                raise ConversionError(
                    f"{path}: cannot read past line {line_number}: {err}"
                ) from None
            line_number += 1
            tracker.tick(line_number)
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
                if encoding != "utf-8":
                    progress.note(f"{path} starts with a UTF-8 byte order mark: read as UTF-8")
                    encoding = "utf-8"
            if not raw.strip():
                continue
            try:
                record = parse_line(decode_line(raw, encoding))
            except BadLine as err:
                policy.bad_line(path, line_number, str(err))
                continue
            if isinstance(record, Repaired):
                policy.repaired_line(path, line_number, record.reason)
                record = record.record
            yield record
    tracker.done(line_number)
