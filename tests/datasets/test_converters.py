"""Tests of dataset_scripts: the written atomic files, the error/skip/duplicate/k-core policies,
the command line, loading the result through RecBole, and the experiment YAMLs."""
import gzip
import io
import json
import os
import sys

import numpy as np
import pytest
import yaml

from conftest import (
    AMAZON_META, AMAZON_REVIEWS, REPO_ROOT, TRUNCATED_LINE, read_atomic, review, run_cli, write_jsonl,
)

from dataset_scripts.amazon2023 import convert_amazon2023
from dataset_scripts.atomic import AtomicOutput, ConversionError, Progress, as_token_seq, clean_text
from dataset_scripts.interactions import InteractionLog, kcore_mask
from dataset_scripts.movielens import convert_ml1m, split_title_year

QUIET = Progress(quiet=True)
INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


# ---------------------------------------------------------------- text cleaning


@pytest.mark.parametrize(
    "raw, title, year",
    [
        ("Misérables, Les (1995)", "Misérables, Les", "1995"),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "City of Lost Children, The (Cité des enfants perdus, La)",
            "1995",
        ),
        ("1984 (1956)", "1984", "1956"),  # a number outside parentheses is not the year
        ("Year (1984) Revisited (2001)", "Year (1984) Revisited", "2001"),  # the last one
        ("No Year Here", "No Year Here", ""),
    ],
)
def test_split_title_year(raw, title, year):
    assert split_title_year(raw) == (title, year)


def test_values_are_made_safe_for_recbole_reader():
    assert clean_text("a\tb\nc\r\nd\x0be\x85f  g ") == "a b c d e f g"
    # a leading double quote would open a quoted field in pandas' CSV reader
    assert clean_text('"Great Performances" Cats') == "'Great Performances' Cats"
    assert clean_text(None) == ""
    assert as_token_seq(["Hair Care", " Skin\tCare ", "", None, "Make-up"]) == (
        "Hair_Care Skin_Care Make-up"
    )


# ---------------------------------------------------------------- MovieLens-1M


def test_ml1m_files(write_ml1m, tmp_path):
    out = tmp_path / "out"
    report = convert_ml1m(str(write_ml1m()), str(out), progress=QUIET)
    directory = out / "ml-1m"
    assert sorted(os.listdir(directory)) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]

    header, rows = read_atomic(directory / "ml-1m.inter")
    assert header == INTER_HEADER
    # 10 lines minus the duplicate; users in order of first appearance, each by time
    assert rows == [
        ["1", "3", "3.0", "978300100"],
        ["1", "2", "4.0", "978300500"],
        ["1", "1", "5.0", "978300760"],
        ["2", "1", "4.0", "978300000"],
        ["2", "2", "2.0", "978400000"],
        ["2", "3", "5.0", "978500000"],
        ["3", "2", "4.0", "978000001"],
        ["3", "3", "1.0", "978000002"],
        ["3", "1", "3.0", "978000003"],
    ]
    assert (report.stats.read, report.stats.duplicates, report.stats.written) == (10, 1, 9)
    assert "exact duplicates removed (same user, item, timestamp): 1" in report.summary()

    header, rows = read_atomic(directory / "ml-1m.item")
    assert header == [
        "item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"
    ]
    assert rows == [  # movie 4 has no rating: not written
        ["1", "Misérables, Les", "1995", "Drama Musical"],
        ["2", "City of Lost Children, The (Cité des enfants perdus, La)", "1995", "Adventure Sci-Fi"],
        ["3", "'Great Performances' Cats", "1998", "Musical"],
    ]

    header, rows = read_atomic(directory / "ml-1m.user")
    assert header == [
        "user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"
    ]
    assert rows == [  # user 4 has no rating: not written
        ["1", "1", "F", "10", "48067"],
        ["2", "56", "M", "16", "70072"],
        ["3", "25", "M", "15", "55117"],
    ]


def test_ml1m_missing_file(write_ml1m, tmp_path):
    raw = write_ml1m()
    os.remove(raw / "movies.dat")
    with pytest.raises(ConversionError, match=r"input file not found: .*movies\.dat"):
        convert_ml1m(str(raw), str(tmp_path / "out"), progress=QUIET)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Amazon Reviews'23


EXPECTED_AMAZON_INTER = [  # by user (first appearance), then time; U1's duplicate written once
    ("U1", "P2", 3.0, 1600000000.001),
    ("U1", "P1", 5.0, 1600000000.123),
    ("U2", "P3", 2.0, 1600000050.0),
    ("U2", "P2", 4.0, 1600000100.0),
    ("U3", "P1", 1.0, 1600000200.0),
    ("U3", "P2", 4.0, 1600000250.0),
    ("U3", "P3", 5.0, 1600000300.0),
]


def test_amazon_inter_from_jsonl_and_gz(write_amazon, tmp_path):
    outputs = []
    for suffix in (".jsonl", ".jsonl.gz"):
        reviews, _ = write_amazon(meta=None, suffix=suffix)
        out = tmp_path / f"out{suffix}"
        report = convert_amazon2023(str(reviews), str(out), "amazon-beauty", progress=QUIET)
        assert report.stats.duplicates == 1
        assert os.listdir(out / "amazon-beauty") == ["amazon-beauty.inter"]
        outputs.append((out / "amazon-beauty" / "amazon-beauty.inter").read_bytes())
    assert outputs[0] == outputs[1]

    header, rows = read_atomic(tmp_path / "out.jsonl" / "amazon-beauty" / "amazon-beauty.inter")
    assert header == INTER_HEADER
    assert [(u, i, float(r), float(t)) for u, i, r, t in rows] == EXPECTED_AMAZON_INTER
    assert rows[0][3] == "1600000000.001"  # milliseconds kept as decimals of seconds


def test_amazon_item_file(write_amazon, tmp_path):
    reviews, meta = write_amazon()
    report = convert_amazon2023(
        str(reviews), str(tmp_path / "out"), "amazon-beauty", meta=str(meta), progress=QUIET
    )
    path = tmp_path / "out" / "amazon-beauty" / "amazon-beauty.item"
    header, rows = read_atomic(path)
    assert header == [
        "item_id:token", "title:token_seq", "store:token", "categories:token_seq",
        "price:float", "main_category:token", "average_rating:float", "rating_number:float",
    ]
    items = {row[0]: dict(zip([h.split(":")[0] for h in header], row)) for row in rows}
    assert list(items) == ["P1", "P2", "P3"]  # P9 was never reviewed
    assert items["P1"]["title"] == "Shampoo with tab and newline"
    assert items["P1"]["store"] == ""  # null
    assert items["P1"]["price"] == ""  # "None"
    assert items["P1"]["categories"] == "Beauty_&_Personal_Care Hair_Care"
    assert float(items["P1"]["average_rating"]) == 4.5
    assert float(items["P1"]["rating_number"]) == 12
    assert items["P2"]["title"] == "Brush"  # the first of two records for P2
    assert items["P2"]["store"] == "ACME Tools"
    assert float(items["P2"]["price"]) == 12.99  # "$12.99"
    assert items["P3"]["title"] == items["P3"]["store"] == items["P3"]["categories"] == ""
    assert float(items["P3"]["price"]) == 7.5
    assert items["P3"]["average_rating"] == items["P3"]["rating_number"] == ""
    assert "None" not in path.read_text(encoding="utf-8")
    assert report.features[str(meta)].repeated == 1
    assert report.rows == {"amazon-beauty.inter": 7, "amazon-beauty.item": 3}


def test_amazon_progress_lines(write_amazon, tmp_path):
    reviews, _ = write_amazon(meta=None)
    stream = io.StringIO()
    convert_amazon2023(
        str(reviews), str(tmp_path / "out"), "x", progress=Progress(interval=0, stream=stream)
    )
    text = stream.getvalue()
    assert "Beauty.jsonl: 1 lines read (" in text  # periodic line (every 0 s here)
    assert "Beauty.jsonl: 8 lines read in" in text and "lines/s" in text  # final line
    quiet = io.StringIO()
    convert_amazon2023(
        str(reviews), str(tmp_path / "out"), "x", progress=Progress(quiet=True, stream=quiet)
    )
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------- bad input


def test_cli_truncated_line_is_an_error_naming_file_and_line(write_amazon, tmp_path):
    reviews, meta = write_amazon(truncated=True)
    out = tmp_path / "out"
    result = run_cli("amazon2023", "--reviews", reviews, "--meta", meta,
                     "--name", "amazon-beauty", "--output", out)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"{reviews}, line {len(AMAZON_REVIEWS) + 1}: invalid JSON" in message
    assert not out.exists()


def test_cli_skip_bad_lines_reports_count(write_amazon, tmp_path):
    reviews, meta = write_amazon(truncated=True)
    out = tmp_path / "out"
    result = run_cli("amazon2023", "--reviews", reviews, "--meta", meta, "--name", "beauty",
                     "--output", out, "--skip-bad-lines", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"bad lines skipped in {reviews}: 1" in result.stdout
    assert f"bad lines skipped in {meta}: 0" in result.stdout
    assert "exact duplicates removed (same user, item, timestamp): 1" in result.stdout
    _, rows = read_atomic(out / "beauty" / "beauty.inter")
    assert len(rows) == len(EXPECTED_AMAZON_INTER)


def test_cli_missing_input_file(tmp_path):
    missing = tmp_path / "Video_Games.jsonl.gz"
    result = run_cli("amazon2023", "--reviews", missing, "--name", "v", "--output", tmp_path / "o")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: input file not found: {missing}"
    assert not (tmp_path / "o").exists()


GOOD_RATING = "1::1::5::978300760"
GOOD_REVIEW = review("U1", "P1", 5.0, 1600000000000)


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("1::2::5", "expected 4 '::'-separated fields"),
        ("1::2::5::978300760::extra", "expected 4 '::'-separated fields"),
        ("1::2::five::978300760", "non-numeric Rating 'five'"),
        ("1::2::5::soon", "non-numeric Timestamp 'soon'"),
        ("::2::5::978300760", "empty UserID"),
        ("1::2::7::978300760", "Rating '7' is out of range (1 to 5)"),
        ("1::2::0::978300760", "Rating '0' is out of range (1 to 5)"),
        ("1::2::5::978_300_760", "non-numeric Timestamp '978_300_760'"),  # int() would take it
        ("1::2::5::978300760.5", "Timestamp '978300760.5' is not a whole number"),
        ("1::2::5::-978300760", "Timestamp '-978300760' is out of range (0 to "),
        ("1::2:: 5::978300760", "non-numeric Rating ' 5'"),
        ("u1::2::5::978300760", "UserID 'u1' is not a whole number"),
        ("1::2.0::5::978300760", "MovieID '2.0' is not a whole number"),
    ],
)
def test_ml1m_bad_rating_lines(write_ml1m, tmp_path, bad_line, reason):
    raw = write_ml1m(ratings=[GOOD_RATING, bad_line])
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert_ml1m(str(raw), str(out), progress=QUIET)
    assert str(error.value).startswith(f"{raw / 'ratings.dat'}, line 2: {reason}")
    assert not out.exists()

    report = convert_ml1m(str(raw), str(out), skip_bad_lines=True, progress=QUIET)
    assert report.skipped_lines[str(raw / "ratings.dat")] == 1
    assert report.stats.written == 1


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (TRUNCATED_LINE, "invalid JSON"),
        ('["U1", "P1", 5.0]', "not a JSON object"),
        (json.dumps({"user_id": "U1", "parent_asin": "P2", "timestamp": 1}), "missing field 'rating'"),
        (review("U1", "P2", None, 1600000000000), "missing field 'rating'"),
        (json.dumps({"parent_asin": "P2", "rating": 1, "timestamp": 1}), "missing field 'user_id'"),
        (review("U1", "P2", 4.0, "yesterday"), "non-numeric timestamp 'yesterday'"),
        (review("U1", "P2", "good", 1600000000000), "non-numeric rating 'good'"),
        (review("U1", "P2", 4.0, 1e30), "timestamp 1e+30 is out of range"),
        (review(["U1"], "P2", 4.0, 1600000000000), "field 'user_id' is not a string"),
        (review("U1", "P2", 0.0, 1600000000000), "rating 0.0 is out of range (1 to 5)"),
        (review("U1", "P2", "4_0", 1600000000000), "non-numeric rating '4_0'"),
        (review("U1", "P2", 4.0, -1), "timestamp -1 is out of range (0 to "),
        (review("U1", "P2", 4.0, "\u0661\u0666"), "non-numeric timestamp '\u0661\u0666'"),  # int() takes it
        (review("", "P2", 4.0, 1600000000000), "empty field 'user_id'"),
        # ids that pandas, reading the atomic file for RecBole, would turn into missing values
        (review("NA", "P2", 4.0, 1600000000000),
         "user_id 'NA' would be read by RecBole (pandas) as a missing value"),
        (review("U1", "null", 4.0, 1600000000000),
         "parent_asin 'null' would be read by RecBole (pandas) as a missing value"),
        (review("nan", "P2", 4.0, 1600000000000),
         "user_id 'nan' would be read by RecBole (pandas) as a missing value"),
        # ids that the atomic file cannot keep as they are
        (review("U1\ud800", "P2", 4.0, 1600000000000),
         "user_id 'U1\\ud800' holds an unpaired surrogate ('\\ud800'), which UTF-8 cannot encode"),
        (review(" U1", "P2", 4.0, 1600000000000), "user_id ' U1' holds characters an atomic file "
         "cannot keep as they are (control characters, double quotes, leading, trailing or "
         "repeated spaces)"),
        (review("U\t1", "P2", 4.0, 1600000000000), "user_id 'U\\t1' holds characters"),
        (review('"U1"', "P2", 4.0, 1600000000000), "user_id '\"U1\"' holds characters"),
    ],
)
def test_amazon_bad_review_lines(tmp_path, bad_line, reason):
    reviews = write_jsonl(tmp_path / "r.jsonl", [GOOD_REVIEW, bad_line])
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert_amazon2023(str(reviews), str(out), "d", progress=QUIET)
    assert str(error.value).startswith(f"{reviews}, line 2: {reason}")
    assert not out.exists()

    report = convert_amazon2023(str(reviews), str(out), "d", skip_bad_lines=True, progress=QUIET)
    assert report.skipped_lines == {str(reviews): 1}
    assert report.stats.written == 1


def test_bad_meta_line_leaves_earlier_output_untouched(write_amazon, tmp_path):
    reviews, meta = write_amazon()
    out = tmp_path / "out"
    convert_amazon2023(str(reviews), str(out), "d", meta=str(meta), progress=QUIET)
    before = {name: (out / "d" / name).read_bytes() for name in os.listdir(out / "d")}

    # the new .inter is already written (under a temporary name) when the meta error comes
    bad_meta = write_jsonl(tmp_path / "bad_meta.jsonl", AMAZON_META[:2] + ['{"title": "x"}'])
    reviews_v2 = write_jsonl(tmp_path / "r2.jsonl", AMAZON_REVIEWS[:3])
    with pytest.raises(ConversionError, match=r"bad_meta\.jsonl, line 3: missing field 'parent_asin'"):
        convert_amazon2023(str(reviews_v2), str(out), "d", meta=str(bad_meta), progress=QUIET)
    after = {name: (out / "d" / name).read_bytes() for name in os.listdir(out / "d")}
    assert after == before  # no temporary file left, nothing replaced


def test_rerun_without_meta_removes_stale_item_file(write_amazon, tmp_path):
    reviews, meta = write_amazon()
    out = tmp_path / "out"
    convert_amazon2023(str(reviews), str(out), "d", meta=str(meta), progress=QUIET)
    assert sorted(os.listdir(out / "d")) == ["d.inter", "d.item"]
    convert_amazon2023(str(reviews), str(out), "d", progress=QUIET)
    assert os.listdir(out / "d") == ["d.inter"]


def test_truncated_gzip_is_an_error_even_when_skipping(tmp_path):
    whole = gzip.compress("".join(line + "\n" for line in AMAZON_REVIEWS * 50).encode())
    reviews = tmp_path / "r.jsonl.gz"
    reviews.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConversionError, match=r"r\.jsonl\.gz: cannot read past line \d+"):
        convert_amazon2023(str(reviews), str(tmp_path / "out"), "d", skip_bad_lines=True,
                           progress=QUIET)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- duplicates and k-core


def test_duplicates_keep_the_first_line_read(tmp_path):
    log = InteractionLog()
    log.add("u", "i", 5.0, 100)
    log.add("u", "i", 1.0, 100)  # same user, item, timestamp: dropped although rating differs
    log.add("u", "i", 2.0, 200)  # another time: kept
    log.add("v", "i", 5.0, 100)  # another user: kept
    stats = log.finish("test input")
    assert stats.duplicates == 1
    with AtomicOutput(tmp_path) as output:
        log.write(output, "t.inter")
    _, rows = read_atomic(tmp_path / "t.inter")
    assert rows == [["u", "i", "5.0", "100"], ["u", "i", "2.0", "200"], ["v", "i", "5.0", "100"]]


# A needs two rounds at K=2: round 1 removes (C, i3), item i3 having one row; then C has one row
# left, removed in round 2. A single pass would keep (C, i1).
KCORE_USERS = np.array([0, 0, 1, 1, 2, 2])  # A A B B C C
KCORE_ITEMS = np.array([1, 2, 1, 2, 1, 3])


def test_kcore_mask_repeats_until_stable():
    keep, rounds = kcore_mask(KCORE_USERS, KCORE_ITEMS, 2)
    assert keep.tolist() == [True, True, True, True, False, False]
    assert rounds == 2
    keep, rounds = kcore_mask(KCORE_USERS, KCORE_ITEMS, 1)
    assert keep.all() and rounds == 0


def test_kcore_in_conversion_filters_features_too(write_ml1m, tmp_path):
    names = {0: "11", 1: "12", 2: "13"}
    ratings = [
        f"{names[u]}::{i}::4::{978300000 + n}"
        for n, (u, i) in enumerate(zip(KCORE_USERS.tolist(), KCORE_ITEMS.tolist()))
    ]
    users = ["11::F::1::10::48067", "12::M::56::16::70072", "13::M::25::15::55117"]
    raw = write_ml1m(ratings=ratings, users=users)
    out = tmp_path / "out"
    report = convert_ml1m(str(raw), str(out), kcore=2, progress=QUIET)
    assert (report.stats.removed_by_kcore, report.stats.kcore_rounds) == (2, 2)
    _, rows = read_atomic(out / "ml-1m" / "ml-1m.inter")
    assert [(u, i) for u, i, _, _ in rows] == [("11", "1"), ("11", "2"), ("12", "1"), ("12", "2")]
    assert [row[0] for row in read_atomic(out / "ml-1m" / "ml-1m.item")[1]] == ["1", "2"]
    assert [row[0] for row in read_atomic(out / "ml-1m" / "ml-1m.user")[1]] == ["11", "12"]

    with pytest.raises(ConversionError, match="the 3-core filter removed all 6 interactions"):
        convert_ml1m(str(raw), str(tmp_path / "out3"), kcore=3, progress=QUIET)


# ---------------------------------------------------------------- through RecBole


@pytest.fixture
def recbole_config(monkeypatch, tmp_path):
    """Build a RecBole Config, isolated from pytest's argv and restoring CUDA_VISIBLE_DEVICES
    (RecBole reads ``--key=value`` from sys.argv and sets that variable)."""
    from recbole.config import Config

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    def make(dataset, config_dict, config_file_list=None):
        settings = {"checkpoint_dir": str(tmp_path / "saved"), "show_progress": False}
        settings.update(config_dict)
        return Config(model="SASRec", dataset=dataset, config_file_list=config_file_list,
                      config_dict=settings)

    return make


LEAVE_ONE_OUT = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}
ALL_USERS_AND_ITEMS = {
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "train_neg_sample_args": None, "loss_type": "CE", "eval_args": LEAVE_ONE_OUT,
}


def tokens(dataset, field, row):
    """The tokens of a token_seq field in one row of item_feat/user_feat (padding dropped)."""
    ids = row[field]
    return list(dataset.id2token(field, ids[ids > 0].numpy()))


def targets_by_user(dataset, split):
    """{user token: (history item tokens, target item token)} of an evaluation split."""
    inter = split.inter_feat
    result = {}
    for n in range(len(inter)):
        user = dataset.id2token("user_id", inter["user_id"][n].item())
        history = inter["item_id_list"][n][: inter["item_length"][n]].numpy()
        result[user] = (list(dataset.id2token("item_id", history)),
                        dataset.id2token("item_id", inter["item_id"][n].item()))
    return result


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_recbole_loads_ml1m(write_ml1m, tmp_path, recbole_config):
    from recbole.data import create_dataset
    from recbole.utils import FeatureType

    out = tmp_path / "out"
    convert_ml1m(str(write_ml1m()), str(out), progress=QUIET)
    config = recbole_config("ml-1m", {
        "data_path": str(out),
        "load_col": {
            "inter": ["user_id", "item_id", "rating", "timestamp"],
            "item": ["item_id", "movie_title", "release_year", "genre"],
            "user": ["user_id", "age", "gender", "occupation", "zip_code"],
        },
        **ALL_USERS_AND_ITEMS,
    })
    dataset = create_dataset(config)
    assert dataset.inter_num == 9
    assert dataset.user_num == 3 + 1 and dataset.item_num == 3 + 1  # + [PAD]
    assert {f: dataset.field2type[f] for f in dataset.field2type} == {
        "user_id": FeatureType.TOKEN, "item_id": FeatureType.TOKEN,
        "rating": FeatureType.FLOAT, "timestamp": FeatureType.FLOAT,
        "movie_title": FeatureType.TOKEN_SEQ, "release_year": FeatureType.TOKEN,
        "genre": FeatureType.TOKEN_SEQ, "age": FeatureType.TOKEN, "gender": FeatureType.TOKEN,
        "occupation": FeatureType.TOKEN, "zip_code": FeatureType.TOKEN,
    }
    train, valid, test = dataset.build()  # also turns item_feat/user_feat into tensors
    movie = dataset.item_feat[dataset.token2id("item_id", "2")]
    assert tokens(dataset, "movie_title", movie) == [
        "City", "of", "Lost", "Children,", "The", "(Cité", "des", "enfants", "perdus,", "La)"
    ]
    assert tokens(dataset, "genre", movie) == ["Adventure", "Sci-Fi"]
    assert dataset.id2token("release_year", movie["release_year"].item()) == "1995"
    quoted = dataset.item_feat[dataset.token2id("item_id", "3")]
    assert tokens(dataset, "movie_title", quoted) == ["'Great", "Performances'", "Cats"]
    user = dataset.user_feat[dataset.token2id("user_id", "2")]
    assert dataset.id2token("gender", user["gender"].item()) == "M"

    # RecBole keeps timestamps as float32: user 3's ratings, 1 s apart, become equal and its
    # stable sort keeps them in file order, which must therefore be time order.
    assert np.float32(978000001) == np.float32(978000003)
    # RecBole first turns each user's n interactions into n-1 (history -> next item) samples,
    # then leaves the last sample out for test and the one before for valid, if one is left:
    # with 3 ratings a user has 1 train and 1 test sample, no valid one.
    assert len(valid) == 0
    assert targets_by_user(dataset, train) == {"1": (["3"], "2"), "2": (["1"], "2"), "3": (["2"], "3")}
    assert targets_by_user(dataset, test) == {
        "1": (["3", "2"], "1"), "2": (["1", "2"], "3"), "3": (["2", "3"], "1"),
    }


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_recbole_loads_amazon(write_amazon, tmp_path, recbole_config):
    from recbole.data import create_dataset
    from recbole.utils import FeatureType

    reviews, meta = write_amazon()
    out = tmp_path / "out"
    convert_amazon2023(str(reviews), str(out), "amazon-beauty", meta=str(meta), progress=QUIET)
    config = recbole_config("amazon-beauty", {
        "data_path": str(out),
        "load_col": {
            "inter": ["user_id", "item_id", "rating", "timestamp"],
            "item": ["item_id", "title", "store", "categories", "price"],
        },
        **ALL_USERS_AND_ITEMS,
    })
    dataset = create_dataset(config)
    assert dataset.inter_num == 7
    assert dataset.user_num == 3 + 1 and dataset.item_num == 3 + 1  # P9 (unreviewed) absent
    assert dataset.field2type["title"] == FeatureType.TOKEN_SEQ
    assert dataset.field2type["store"] == FeatureType.TOKEN
    assert dataset.field2type["categories"] == FeatureType.TOKEN_SEQ
    assert dataset.field2type["price"] == FeatureType.FLOAT
    train, _, _ = dataset.build()  # also turns item_feat into tensors
    p1 = dataset.item_feat[dataset.token2id("item_id", "P1")]
    assert tokens(dataset, "title", p1) == ["Shampoo", "with", "tab", "and", "newline"]
    assert tokens(dataset, "categories", p1) == ["Beauty_&_Personal_Care", "Hair_Care"]
    assert dataset.id2token("store", p1["store"].item()) == "[PAD]"  # missing
    assert p1["price"].item() == pytest.approx((12.99 + 7.5) / 2)  # missing: RecBole's mean
    p2 = dataset.item_feat[dataset.token2id("item_id", "P2")]
    assert dataset.id2token("store", p2["store"].item()) == "ACME Tools"
    assert p2["price"].item() == pytest.approx(12.99)

    # U1's two reviews are 122 ms apart, one float32 value in RecBole: file order decides.
    # (With two interactions, U1's one sample stays in train.)
    assert targets_by_user(dataset, train)["U1"] == (["P2"], "P1")


# ---------------------------------------------------------------- experiment YAMLs


@pytest.mark.parametrize(
    "dataset, max_len",
    [("ml-1m", 200), ("amazon-beauty", 50), ("amazon-video-games", 50)],
)
def test_yaml_settings(dataset, max_len, tmp_path, recbole_config):
    path = os.path.join(REPO_ROOT, "yaml_configs", f"{dataset}.yaml")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert isinstance(yaml.safe_load(text), dict)
    assert "python -m dataset_scripts" in text and f"--dataset={dataset} " in text

    config = recbole_config(dataset, {"data_path": str(tmp_path)}, config_file_list=[path])
    assert config["data_path"] == os.path.join(str(tmp_path), dataset)
    assert config["MAX_ITEM_LIST_LENGTH"] == max_len
    assert config["eval_args"] == {
        "split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
        "mode": {"valid": "full", "test": "full"},
    }
    assert config["metrics"] == ["Hit", "NDCG", "MRR"]
    assert config["topk"] == [10]
    assert config["valid_metric"] == "NDCG@10"
    assert config["load_col"] == {"inter": ["user_id", "item_id", "rating", "timestamp"]}
    assert config["user_inter_num_interval"] == config["item_inter_num_interval"] == "[5,inf)"
    assert (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]) == (
        "user_id", "item_id", "timestamp"
    )
    assert (config["learner"], config["learning_rate"], config["loss_type"]) == ("adam", 0.001, "CE")
    assert (config["train_batch_size"], config["eval_batch_size"]) == (2048, 4096)
    assert (config["epochs"], config["stopping_step"]) == (200, 10)
    assert config["train_neg_sample_args"]["distribution"] == "none"  # from `~` with CE


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ml1m_yaml_loads_converted_data(write_ml1m, tmp_path, recbole_config):
    from recbole.data import create_dataset

    out = tmp_path / "out"
    convert_ml1m(str(write_ml1m()), str(out), progress=QUIET)
    path = os.path.join(REPO_ROOT, "yaml_configs", "ml-1m.yaml")
    # the YAML's 5-core filter would empty this tiny dataset
    config = recbole_config("ml-1m", {
        "data_path": str(out), "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
    }, config_file_list=[path])
    dataset = create_dataset(config)
    assert dataset.inter_num == 9 and dataset.item_feat is None  # load_col: inter only
    # 3 users x 3 ratings: 2 samples each, 1 for train and 1 for test (see above)
    assert [len(split) for split in dataset.build()] == [3, 0, 3]
