"""Raw input that used to crash a conversion or change the data silently: encodings and byte order
marks, unpaired surrogates, values RecBole's reader would drop or reinterpret, feature rows that
are missing, and conversions that are interrupted."""
import codecs
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    AMAZON_META, AMAZON_REVIEWS, ML1M_MOVIES, ML1M_RATINGS, ML1M_USERS, REPO_ROOT, read_atomic,
    review, run_cli, write_jsonl,
)

from dataset_scripts.amazon2023 import convert_amazon2023
from dataset_scripts.atomic import NA_MARKERS, ConversionError, Progress
from dataset_scripts.movielens import convert_ml1m

QUIET = Progress(quiet=True)
BOM = codecs.BOM_UTF8.decode("utf-8")


def column(path, index):
    return [row[index] for row in read_atomic(path)[1]]


# ---------------------------------------------------------------- encodings


def test_bom_at_the_start_of_ratings_dat(write_ml1m, tmp_path):
    """A UTF-8 byte order mark used to make user 1 of the first line a second user '\\ufeff1'."""
    raw = write_ml1m()
    (raw / "ratings.dat").write_bytes(codecs.BOM_UTF8 + (raw / "ratings.dat").read_bytes())
    stream = io.StringIO()
    report = convert_ml1m(str(raw), str(tmp_path / "out"), progress=Progress(stream=stream))
    assert f"{raw / 'ratings.dat'} starts with a UTF-8 byte order mark: read as UTF-8" in stream.getvalue()
    assert report.stats.users == 3
    assert sorted(set(column(tmp_path / "out" / "ml-1m" / "ml-1m.inter", 0))) == ["1", "2", "3"]


def test_utf8_movies_dat_with_bom_or_encoding_option(write_ml1m, tmp_path):
    """movies.dat saved again as UTF-8: with a BOM it is read as UTF-8 anyway; without one,
    ``encoding="utf-8"`` (``--encoding utf-8``) says so."""
    raw = write_ml1m()
    utf8 = "".join(line + "\n" for line in ML1M_MOVIES).encode("utf-8")
    for data, encoding in ((codecs.BOM_UTF8 + utf8, "latin-1"), (utf8, "utf-8")):
        (raw / "movies.dat").write_bytes(data)
        out = tmp_path / f"out-{encoding}"
        convert_ml1m(str(raw), str(out), progress=QUIET, encoding=encoding)
        assert column(out / "ml-1m" / "ml-1m.item", 1)[0] == "Misérables, Les"


def test_latin1_file_read_as_utf8_is_a_bad_line(write_ml1m, tmp_path):
    raw = write_ml1m()  # movies.dat is Latin-1: "Misérables" has the single byte 0xe9
    with pytest.raises(ConversionError, match=(
            rf"^{raw / 'movies.dat'}, line 1: not valid utf-8: byte 0xe9 at column 7 ")):
        convert_ml1m(str(raw), str(tmp_path / "out"), progress=QUIET, encoding="utf-8")
    assert not (tmp_path / "out").exists()


def test_bom_at_the_start_of_a_jsonl_file(tmp_path):
    reviews = tmp_path / "r.jsonl"
    reviews.write_bytes(codecs.BOM_UTF8 + "".join(line + "\n" for line in AMAZON_REVIEWS).encode())
    report = convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", progress=QUIET)
    assert report.stats.users == 3
    assert column(tmp_path / "out" / "d" / "d.inter", 0)[0] == "U1"


def test_invalid_utf8_in_a_review_line(tmp_path):
    reviews = tmp_path / "r.jsonl"
    bad = review("U2", "P1", 4.0, 1600000000000).encode().replace(b'"Nice"', b'"Ni\xffce"')
    reviews.write_bytes(AMAZON_REVIEWS[0].encode() + b"\n" + bad + b"\n")
    with pytest.raises(ConversionError, match=rf"^{reviews}, line 2: not valid utf-8: byte 0xff at column"):
        convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", progress=QUIET)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- unpaired surrogates (JSON "\ud800")


def test_surrogate_in_a_review_id_is_a_bad_line(tmp_path):
    """It used to end the run with a UnicodeEncodeError traceback from the writer."""
    reviews = write_jsonl(tmp_path / "r.jsonl", [AMAZON_REVIEWS[0], review("U\ud800", "P1", 4.0, 1)])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="^" + re.escape(
            f"{reviews}, line 2: user_id 'U\\ud800' holds an unpaired surrogate ('\\ud800'), "
            "which UTF-8 cannot encode")):
        convert_amazon2023(str(reviews), str(out), "d", progress=QUIET)
    assert not out.exists()
    report = convert_amazon2023(str(reviews), str(out), "d", skip_bad_lines=True, progress=QUIET)
    assert report.skipped_lines == {str(reviews): 1} and report.stats.written == 1


def test_surrogate_in_review_text_is_harmless(tmp_path):
    """The review's text is not written, so its surrogate does not matter."""
    reviews = write_jsonl(tmp_path / "r.jsonl",
                          [review("U1", "P1", 4.0, 1, text="broken \ud83d emoji")])
    report = convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", progress=QUIET)
    assert report.stats.written == 1 and not report.policy.repaired


def test_surrogate_in_meta_text_is_repaired_never_fatal(write_amazon, tmp_path):
    meta = [
        AMAZON_META[0],
        json.dumps({"parent_asin": "P2", "title": "Brush \ud800", "store": "\udfffACME",
                    "categories": ["Hair \ud800Care"]}),
        json.dumps({"parent_asin": "P3", "title": "Comb"}),
    ]
    reviews, meta_path = write_amazon(meta=meta)
    stream = io.StringIO()
    report = convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", meta=str(meta_path),
                                progress=Progress(stream=stream))
    item = tmp_path / "out" / "d" / "d.item"
    rows = {row[0]: row for row in read_atomic(item)[1]}  # read_atomic decodes strictly
    assert rows["P2"][1:4] == ["Brush \ufffd", "\ufffdACME", "Hair_\ufffdCare"]
    assert rows["P3"][1] == "Comb"
    reason = "unpaired surrogates in title, store, categories replaced by U+FFFD"
    assert f"repaired {meta_path}, line 2: {reason}" in stream.getvalue()
    assert f"lines repaired in {meta_path}: 1 (first: line 2: {reason})" in report.summary()


def test_surrogate_in_a_meta_id_is_a_bad_line(write_amazon, tmp_path):
    reviews, meta_path = write_amazon(meta=[AMAZON_META[0], json.dumps({"parent_asin": "P\ud800"})])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="^" + re.escape(
            f"{meta_path}, line 2: parent_asin 'P\\ud800' holds an unpaired surrogate")):
        convert_amazon2023(str(reviews), str(out), "d", meta=str(meta_path), progress=QUIET)
    assert not out.exists()


# ---------------------------------------------------------------- what RecBole's reader would change


def test_na_markers_are_pandas_own():
    """The converter refuses as ids exactly the values that RecBole's CSV reader makes missing."""
    from pandas._libs.parsers import STR_NA_VALUES

    assert NA_MARKERS == set(STR_NA_VALUES)


def test_feature_values_read_as_missing_are_written_empty(write_ml1m, tmp_path):
    """A movie titled "NA" and a zip code "null": RecBole would read both as missing; the file
    says so, and the summary counts them."""
    movies = [ML1M_MOVIES[0], "2::NA (1995)::Drama", ML1M_MOVIES[2]]
    users = [ML1M_USERS[0], "2::M::56::16::null", ML1M_USERS[2]]
    raw = write_ml1m(movies=movies, users=users)
    report = convert_ml1m(str(raw), str(tmp_path / "out"), progress=QUIET)
    directory = tmp_path / "out" / "ml-1m"
    assert column(directory / "ml-1m.item", 1) == ["Misérables, Les", "", "'Great Performances' Cats"]
    assert column(directory / "ml-1m.user", 4) == ["48067", "", "55117"]
    summary = report.summary()
    for name in ("movies.dat", "users.dat"):
        assert (f"values that RecBole reads as missing (NA, null, ...) in {raw / name}, written "
                "empty: 1") in summary


def test_canonical_movielens_ids(write_ml1m, tmp_path):
    """MovieLens ids are numbers: 01 in ratings.dat is movie 1 of movies.dat."""
    raw = write_ml1m(ratings=["01::001::5::978300760", "1::2::3::978300761"])
    report = convert_ml1m(str(raw), str(tmp_path / "out"), progress=QUIET)
    assert report.stats.users == 1 and not report.warnings
    assert column(tmp_path / "out" / "ml-1m" / "ml-1m.inter", 1) == ["1", "2"]


def test_rated_movies_and_users_missing_from_their_files(write_ml1m, tmp_path):
    ratings = ML1M_RATINGS + ["7::1::4::978300000", "1::9::4::978300001"]
    raw = write_ml1m(ratings=ratings)
    out = tmp_path / "out"
    result = run_cli("ml-1m", "--input", raw, "--output", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: 1 of the 4 movies of the written interactions have no line in {raw / 'movies.dat'}: "
        "they are written without features",
        f"warning: 1 of the 4 users of the written interactions have no line in {raw / 'users.dat'}: "
        "they are written without features",
    ]
    assert "9" in column(out / "ml-1m" / "ml-1m.inter", 1)  # the rating itself is kept
    assert "9" not in column(out / "ml-1m" / "ml-1m.item", 0)


def test_reviewed_items_missing_from_meta(write_amazon, tmp_path):
    reviews, meta = write_amazon(meta=AMAZON_META[:2])  # P3 has no meta line
    report = convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", meta=str(meta),
                                progress=QUIET)
    assert report.warnings == [
        f"1 of the 3 items of the written interactions have no line in {meta}: "
        "they are written without features"
    ]


# ---------------------------------------------------------------- interrupted conversions


def finished_process_id():
    """The id of a process that has ended (and so can be no conversion running now)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_a_killed_run_are_removed(write_amazon, tmp_path):
    """SIGKILL leaves a run no chance to clean up; the next run of that dataset does it, and only
    for files that are its own and whose process is gone."""
    reviews, _ = write_amazon(meta=None)
    directory = tmp_path / "out" / "d"
    directory.mkdir(parents=True)
    dead, alive = finished_process_id(), os.getppid()
    stale = [directory / f".d.inter.tmp-{dead}", directory / f".d.item.tmp-{dead}"]
    kept = [directory / f".d.inter.tmp-{alive}",  # a conversion that may still be running
            directory / f".other.inter.tmp-{dead}",  # another dataset's
            directory / "notes.tmp-1"]
    for path in stale + kept:
        path.write_text("partial")
    report = convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", progress=QUIET)
    assert sorted(os.listdir(directory)) == sorted(["d.inter"] + [path.name for path in kept])
    assert sorted(report.stale_removed) == sorted(map(str, stale))
    assert "temporary files of interrupted earlier runs removed: 2" in report.summary()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopped_conversion_leaves_nothing(tmp_path, stop):
    """SIGTERM (or Ctrl-C) while the meta file is read, the .inter already written under its
    temporary name: everything the run created is removed."""
    reviews = write_jsonl(tmp_path / "r.jsonl", AMAZON_REVIEWS)
    line = json.dumps({"parent_asin": "X", "title": "a never reviewed item"})
    meta = tmp_path / "meta.jsonl"
    meta.write_text((line + "\n") * 100_000)  # read for a second or so
    out = tmp_path / "out"
    # The converter must not inherit an ignored SIGINT, as the tests do when a shell runs them as a
    # background job (and Python then keeps it ignored): caught signals are reset at exec, ignored
    # ones are not, so catch it here while the converter starts.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "dataset_scripts", "amazon2023", "--reviews", str(reviews),
             "--meta", str(meta), "--name", "d", "--output", str(out), "--quiet"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while not (out / "d").is_dir() or not os.listdir(out / "d"):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop
    assert stderr.strip().splitlines()[-1] in (
        "stopped by SIGTERM; no partial output left", "interrupted; no partial output left")
    assert not out.exists(), list(os.walk(out))
