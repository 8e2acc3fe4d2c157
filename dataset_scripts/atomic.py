"""Shared machinery for writing RecBole atomic files.

Used by every converter:
  - ``Field``: a (name, type) pair, written in the header as ``name:type``;
  - value cleaning, so that every written value is safe for RecBole's tab-separated reader;
  - ``AtomicOutput``: files written under temporary names, renamed into place only on success;
  - ``read_records``: streaming line reader (plain or gzip) with progress on stderr and the
    bad-line policy (stop with file and line number, or skip and count).
"""
import gzip
import math
import os
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


class ConversionError(Exception):
    """A problem that stops the conversion; its text is the one-line message shown to the user."""


class BadLine(Exception):
    """Raised by a line parser: this line is malformed (the text says why)."""


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


def clean_text(value):
    """A value as one line of text, safe as a ``token`` and, split at spaces, as a ``token_seq``
    of words: control characters become spaces, double quotes become single quotes, runs of
    whitespace become one space, no leading/trailing space. ``None`` becomes ""."""
    if value is None:
        return ""
    text = _UNSAFE_CHARS.sub(" ", str(value)).replace('"', "'")
    return " ".join(text.split())


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


def parse_number(value, name):
    """A finite number from a JSON number or a numeric string (int kept as int); ``BadLine``
    for anything else, naming the field."""
    if value is None:
        raise BadLine(f"missing field {name!r}")
    if isinstance(value, bool):
        raise BadLine(f"non-numeric {name} {value!r}")
    if isinstance(value, (int, float)):
        number = value
    else:
        text = str(value).strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise BadLine(f"non-numeric {name} {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise BadLine(f"non-numeric {name} {value!r}")
    return number


def parse_integer(value, name):
    """Like ``parse_number`` but the value must be a whole number; returns an int."""
    number = parse_number(value, name)
    if isinstance(number, float):
        if not number.is_integer():
            raise BadLine(f"{name} {value!r} is not a whole number")
        number = int(number)
    if not -(2**63) <= number < 2**63:
        raise BadLine(f"{name} {value!r} is out of range")
    return number


def write_feature_rows(writer, rows, wanted):
    """Write the rows (tuples of formatted strings, id first) whose id satisfies ``wanted``,
    each id once (the first row read is kept). Returns how many repeated rows were dropped."""
    seen = set()
    repeated = 0
    for row in rows:
        row_id = row[0]
        if not wanted(row_id):
            continue
        if row_id in seen:
            repeated += 1
            continue
        seen.add(row_id)
        writer.write(row)
    return repeated


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

    Each file is written to a hidden temporary name in the target directory; when the ``with``
    block ends without an exception, all are renamed to their final names, and the files named in
    ``replaces`` that this run did not write (left by an earlier run) are removed, so that the
    directory never mixes two runs. On an exception, the temporary files are deleted, and so are
    the directories this object created, leaving nothing behind.
    """

    def __init__(self, directory, replaces=()):
        self.directory = os.path.abspath(directory)
        self.replaces = tuple(replaces)
        self.written = []  # final paths, in the order they were opened
        self._open = []  # (temporary path, final path, handle)
        self._created_dirs = []

    def __enter__(self):
        missing = []
        path = self.directory
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except OSError as err:
                self._remove_created_dirs()
                raise ConversionError(f"cannot create output directory {path}: {err.strerror}")
            self._created_dirs.append(path)
        return self

    def open(self, filename, fields):
        """Start writing ``filename`` (in the dataset directory) with this header."""
        final = os.path.join(self.directory, filename)
        temporary = os.path.join(self.directory, f".{filename}.tmp-{os.getpid()}")
        handle = open(temporary, "w", encoding="utf-8", newline="\n")
        self._open.append((temporary, final, handle))
        return RowWriter(handle, fields)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
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
        for temporary, _, handle in self._open:
            handle.close()
            if os.path.exists(temporary):
                os.remove(temporary)
        self._remove_created_dirs()

    def _remove_created_dirs(self):
        for path in reversed(self._created_dirs):
            try:
                os.rmdir(path)
            except OSError:
                pass


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
    skipped. ``skipped`` counts skipped lines per file; the first few reasons are shown."""

    skip: bool = False
    progress: Progress = None
    shown_per_file: int = 3
    skipped: Counter = field(default_factory=Counter)

    def bad_line(self, path, line_number, reason):
        if not self.skip:
            raise ConversionError(
                f"{path}, line {line_number}: {reason} (use --skip-bad-lines to skip such lines)"
            )
        self.skipped[path] += 1
        if self.progress is not None and self.skipped[path] <= self.shown_per_file:
            self.progress.note(f"skipping {path}, line {line_number}: {reason}")


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


def read_records(path, parse_line, policy, progress):
    """Yield ``parse_line(raw_bytes)`` for each non-blank line of ``path``, streaming.

    ``parse_line`` raises ``BadLine`` for a malformed line, which ``policy`` turns into an error
    naming the file and the line number (1-based), or a skipped line. A file that cannot be read
    to its end (e.g. truncated gzip) is always an error.
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
            if not raw.strip():
                continue
            try:
                record = parse_line(raw)
            except BadLine as err:
                policy.bad_line(path, line_number, str(err))
                continue
            yield record
    tracker.done(line_number)
