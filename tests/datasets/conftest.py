"""Raw inputs in the exact formats of MovieLens-1M and Amazon Reviews'23, written into tmp_path."""
import gzip
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:  # `pytest` without `python -m` does not put the cwd on sys.path
    sys.path.insert(0, REPO_ROOT)

# MovieLens-1M. User 1 has an exact duplicate line; file order is not time order within users 1
# and 3 (user 3's three ratings are 1 s apart: the same timestamp once RecBole casts to float32).
ML1M_RATINGS = [
    "1::1::5::978300760",
    "1::3::3::978300100",
    "1::2::4::978300500",
    "1::2::4::978300500",
    "2::2::2::978400000",
    "2::1::4::978300000",
    "2::3::5::978500000",
    "3::1::3::978000003",
    "3::2::4::978000001",
    "3::3::1::978000002",
]
ML1M_MOVIES = [
    "1::Misérables, Les (1995)::Drama|Musical",
    "2::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi",
    '3::"Great Performances" Cats (1998)::Musical',
    "4::Toy Story (1995)::Animation|Children's|Comedy",  # never rated
]
ML1M_USERS = [
    "1::F::1::10::48067",
    "2::M::56::16::70072",
    "3::M::25::15::55117",
    "4::F::45::7::02460",  # no ratings
]


def write_dat(path, lines):
    """A MovieLens ``.dat`` file: Latin-1, ``\\n`` line ends."""
    with open(path, "wb") as handle:
        handle.write("".join(line + "\n" for line in lines).encode("latin-1"))


@pytest.fixture
def write_ml1m(tmp_path):
    """Write ratings/movies/users.dat (defaults above) into a fresh directory; returns it."""

    def write(ratings=ML1M_RATINGS, movies=ML1M_MOVIES, users=ML1M_USERS, name="raw-ml1m"):
        raw = tmp_path / name
        raw.mkdir()
        write_dat(raw / "ratings.dat", ratings)
        write_dat(raw / "movies.dat", movies)
        write_dat(raw / "users.dat", users)
        return raw

    return write


def review(user, parent_asin, rating, timestamp, asin=None, **extra):
    """A review line as in Amazon Reviews'23 (text fields included, to be dropped)."""
    record = {
        "rating": rating,
        "title": "Nice",
        "text": "Works\tas described.\nWould buy again.",
        "images": [],
        "asin": asin or parent_asin,
        "parent_asin": parent_asin,
        "user_id": user,
        "timestamp": timestamp,
        "helpful_vote": 0,
        "verified_purchase": True,
    }
    record.update(extra)
    return json.dumps(record)


# Amazon reviews: U1's P2 review appears twice (exact duplicate); U2 bought P3 as variant B0VAR3.
AMAZON_REVIEWS = [
    review("U1", "P1", 5.0, 1600000000123),
    review("U1", "P2", 3.0, 1600000000001),
    review("U1", "P2", 3.0, 1600000000001),
    review("U2", "P2", 4.0, 1600000100000),
    review("U2", "P3", 2.0, 1600000050000, asin="B0VAR3"),
    review("U3", "P1", 1.0, 1600000200000),
    review("U3", "P3", 5.0, 1600000300000),
    review("U3", "P2", 4.0, 1600000250000),
]
TRUNCATED_LINE = '{"user_id": "A1", "par'

AMAZON_META = [
    json.dumps({
        "main_category": "All Beauty", "title": "Shampoo\twith tab\nand newline",
        "average_rating": 4.5, "rating_number": 12, "features": ["Gentle"],
        "description": ["A shampoo."], "price": "None", "images": [], "videos": [],
        "store": None, "categories": ["Beauty & Personal Care", "Hair Care"],
        "details": {"Size": "250 ml"}, "parent_asin": "P1", "bought_together": None,
    }),
    json.dumps({
        "main_category": "All Beauty", "title": "Brush", "average_rating": 3.0,
        "rating_number": 2, "price": "$12.99", "store": "ACME Tools", "categories": [],
        "parent_asin": "P2",
    }),
    json.dumps({"parent_asin": "P2", "title": "Brush, second record", "price": 1.0}),
    json.dumps({
        "main_category": None, "average_rating": None, "rating_number": None,
        "price": 7.5, "store": "None", "categories": None, "parent_asin": "P3",
    }),
    json.dumps({"title": "Never reviewed", "price": 3.0, "parent_asin": "P9"}),
]


def write_jsonl(path, lines, final_newline=True):
    """A ``.jsonl`` file, gzip-compressed when the name ends in ``.gz``."""
    data = "\n".join(lines) + ("\n" if final_newline else "")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(data)
    return path


@pytest.fixture
def write_amazon(tmp_path):
    """Write a review file (and meta file) into tmp_path; returns their paths."""

    def write(reviews=AMAZON_REVIEWS, meta=AMAZON_META, suffix=".jsonl", truncated=False):
        reviews_path = tmp_path / f"Beauty{suffix}"
        lines = list(reviews) + ([TRUNCATED_LINE] if truncated else [])
        write_jsonl(reviews_path, lines, final_newline=not truncated)
        meta_path = None
        if meta is not None:
            meta_path = write_jsonl(tmp_path / f"meta_Beauty{suffix}", meta)
        return reviews_path, meta_path

    return write


def read_atomic(path):
    """(header fields, rows) of an atomic file, checking that every row has the header's width."""
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8")
    assert "\r" not in text
    lines = text.split("\n")
    assert lines[-1] == ""  # newline-terminated
    header, *rows = [line.split("\t") for line in lines[:-1]]
    assert all(len(row) == len(header) for row in rows)
    return header, rows


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dataset_scripts", *map(str, args)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
