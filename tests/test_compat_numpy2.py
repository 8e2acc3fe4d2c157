"""recbole_ssm.compat's fixes for pandas 3 (5 to 7 in its docstring).

They run in any environment: with pandas 2, copy-on-write and the string dtype are switched on
to behave as pandas 3 does. ``test_numpy2_environment.py`` also runs this file under NumPy 2 and
pandas 3.
"""
import importlib
import math
import os
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import recbole_ssm  # noqa: F401  (applies the fixes)
from recbole_ssm import compat

PANDAS_MAJOR = int(pd.__version__.split(".")[0])

# Warnings that RecBole's dataset code gave with pandas 2, about what goes wrong with pandas 3.
PANDAS3_WARNINGS = (
    "through chained assignment using an inplace method",
    "in Series.agg cannot aggregate",
)

INTER = ["user_id:token\titem_id:token\ttimestamp:float"] + [
    f"u{user}\ti{(user + step) % 8 + 1}\t{user * 100 + step}"
    for user in range(1, 7) for step in range(6)
]
# i2: no title, i3: no year, i4: no price, i5: no vec; i8 is missing from the file altogether.
ITEMS = [
    "item_id:token\ttitle:token_seq\tyear:token\tprice:float\tvec:float_seq",
    "i1\tred box\t1990\t1.0\t1 2",
    "i2\t\t1991\t2.0\t3",
    "i3\tblue box\t\t3.0\t4 5 6",
    "i4\tred\t1993\t\t7",
    "i5\tbig blue box\t1994\t5.0\t",
    "i6\tbox\t1995\t6.0\t8 9",
    "i7\tgreen\t1996\t7.0\t10",
]
ITEM_FEATURES = ["item_id", "title", "year", "price", "vec"]
KNOWN_PRICES = [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]

BENCHMARK = {
    "train": [("s1", "i1 i2", "i3"), ("s2", "i3", "i1"), ("s3", "i2 i3 i1 i2", "i4")],
    "valid": [("s4", "i4 i1 i3", "i2")],
    "test": [("s5", "i1 i2 i3 i4 i1", "i3"), ("s6", "i2", "i1")],
}


@pytest.fixture
def pandas3_semantics():
    """With pandas 2, switch on copy-on-write and the string dtype, pandas 3's defaults."""
    if PANDAS_MAJOR >= 3:
        yield
        return
    with pd.option_context("mode.copy_on_write", True, "future.infer_string", True):
        yield


@pytest.fixture
def recbole_dataset(monkeypatch, tmp_path, pandas3_semantics):
    """Build a RecBole dataset from atomic files in tmp_path, recording every warning."""
    from recbole.config import Config
    from recbole.data import create_dataset

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # RecBole reads --key=value from sys.argv
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    def build(name, files, **config_dict):
        folder = tmp_path / name
        folder.mkdir()
        for suffix, lines in files.items():
            (folder / f"{name}.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        settings = {"data_path": str(tmp_path), "checkpoint_dir": str(tmp_path / "saved"),
                    "show_progress": False}
        settings.update(config_dict)
        config = Config(model="Mamba4Rec", dataset=name, config_dict=settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = create_dataset(config)
        pandas_warnings = [str(w.message) for w in caught
                           if any(text in str(w.message) for text in PANDAS3_WARNINGS)]
        return dataset, pandas_warnings

    return build


def item_rows(dataset):
    """item_feat as {item token: row} (item_feat is still a DataFrame after create_dataset)."""
    tokens = dataset.field2id_token["item_id"]
    return {str(tokens[row["item_id"]]): row for _, row in dataset.item_feat.iterrows()}


def tokens_of(dataset, field, ids):
    return [str(dataset.field2id_token[field][i]) for i in ids]


def test_item_features_with_missing_values(recbole_dataset):
    """Fix 5: empty seq values load as empty sequences; missing tokens/floats are filled."""
    dataset, pandas_warnings = recbole_dataset(
        "toy", {"inter": INTER, "item": ITEMS},
        load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ITEM_FEATURES},
        # keep i8's interactions although i8 has no line in the item file
        filter_inter_by_user_or_item=False,
    )
    assert pandas_warnings == []
    rows = item_rows(dataset)

    assert tokens_of(dataset, "title", rows["i1"]["title"]) == ["red", "box"]
    assert tokens_of(dataset, "title", rows["i5"]["title"]) == ["big", "blue", "box"]
    assert len(rows["i2"]["title"]) == 0  # empty in the file
    assert len(rows["i8"]["title"]) == 0  # not in the file
    assert list(rows["i3"]["vec"]) == [4.0, 5.0, 6.0]
    assert len(rows["i5"]["vec"]) == 0
    assert len(rows["i8"]["vec"]) == 0

    mean_price = sum(KNOWN_PRICES) / len(KNOWN_PRICES)
    prices = {item: float(row["price"]) for item, row in rows.items()}
    assert not any(math.isnan(price) for price in prices.values())
    assert prices["i1"] == 1.0 and prices["i7"] == 7.0
    assert prices["i4"] == pytest.approx(mean_price)  # empty in the file: the field's mean
    assert prices["i8"] == pytest.approx(mean_price)  # not in the file: the mean too

    years = {item: float(row["year"]) for item, row in rows.items()}
    assert not any(math.isnan(year) for year in years.values())
    assert years["i3"] == 0 and years["i8"] == 0  # [PAD]
    assert tokens_of(dataset, "year", [int(years["i1"]), int(years["i7"])]) == ["1990", "1996"]


def test_benchmark_files_item_length(recbole_dataset):
    """Fix 6: item_length of a benchmark file is each sequence's length, not the file's."""
    files = {f"{part}.inter": ["session_id:token\titem_id_list:token_seq\titem_id:token"]
             + ["\t".join(row) for row in rows] for part, rows in BENCHMARK.items()}
    dataset, pandas_warnings = recbole_dataset(
        "bench", files, USER_ID_FIELD="session_id", load_col=None,
        benchmark_filename=list(BENCHMARK), alias_of_item_id=["item_id_list"],
    )
    assert pandas_warnings == []
    inter = dataset.inter_feat
    expected = [(items.split(), target) for rows in BENCHMARK.values() for _, items, target in rows]
    assert [tokens_of(dataset, "item_id", ids) for ids in inter["item_id_list"]] == [
        items for items, _ in expected]
    assert tokens_of(dataset, "item_id", inter["item_id"]) == [target for _, target in expected]
    assert list(inter["item_length"]) == [len(items) for items, _ in expected]


def test_series_agg_len_per_element():
    series = pd.Series([np.array([1, 2]), np.array([3]), np.array([], dtype=np.int64)])
    agg = pd.Series.agg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with compat.series_agg_len_per_element():
            assert list(series.agg(len)) == [2, 1, 0]
            assert list(series.agg(np.concatenate)) == [1, 2, 3]  # other functions: unchanged
            assert series.agg("count") == 3
    assert pd.Series.agg is agg


def test_seq_fields_read_filled(tmp_path):
    path = tmp_path / "x.item"
    path.write_text("item_id:token\ttitle:token_seq\tprice:float\nA\t\t\nB\tb c\t1.5\n")
    read_csv = pd.read_csv
    with compat.seq_fields_read_filled():
        df = pd.read_csv(path, sep="\t", dtype={"item_id:token": str, "title:token_seq": str})
    assert pd.read_csv is read_csv
    assert list(df["title:token_seq"]) == ["", "b c"]
    assert math.isnan(df["price:float"][0])  # only seq fields are filled here


def test_dataset_methods_patched_once():
    from recbole.data.dataset.dataset import Dataset

    def defined(module, cls, method):
        return getattr(importlib.import_module(module), cls).__dict__[method]

    before = {key: defined(*key) for key in compat.AGG_LEN_METHODS}
    load_feat = Dataset._load_feat
    compat.apply()  # idempotent
    assert Dataset._load_feat is load_feat
    assert Dataset._fill_nan is compat.fill_nan
    for key, function in before.items():
        patched = defined(*key)
        assert patched is function
        assert patched.__wrapped_by_recbole_ssm__


def test_not_writable_warning_silenced_for_recbole_data_only():
    compat.apply()  # again: pytest restores the warning filters after collecting this module
    ours = [(module_re, category) for action, message, category, module_re, _ in warnings.filters
            if action == "ignore" and message is not None
            and message.match("The given NumPy array is not writable")]
    assert ours, "compat.apply() installs the filter"
    for module_re, category in ours:
        assert category is UserWarning
        assert module_re.match("recbole.data.dataset.dataset")
        assert not module_re.match("my_project.data")
