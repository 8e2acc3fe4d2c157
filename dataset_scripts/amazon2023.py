"""Amazon Reviews'23 (review file and optional ``meta_*`` file, ``.jsonl`` or ``.jsonl.gz``) to
RecBole atomic files.

The item is the review's ``parent_asin`` (the product, all variants together), as in the
dataset's own benchmarks. Timestamps are milliseconds in the input, seconds in the output.
Only the few needed fields of each line are kept; review texts are parsed and dropped.
"""
import json
import math
import os
import re

from .atomic import (
    AtomicOutput,
    BadLine,
    BadLinePolicy,
    ConversionError,
    Field,
    Progress,
    Repaired,
    as_float,
    as_token_seq,
    clean_text,
    parse_id,
    parse_integer,
    parse_number,
    read_records,
    unpaired_surrogate,
    write_feature_rows,
)
from .interactions import ConversionReport, InteractionLog

ENCODING = "utf-8"  # JSON Lines are UTF-8
RATING_RANGE = (1, 5)  # stars

ITEM_FIELDS = (
    Field("item_id", "token"),
    Field("title", "token_seq"),
    Field("store", "token"),
    Field("categories", "token_seq"),
    Field("price", "float"),
    Field("main_category", "token"),
    Field("average_rating", "float"),
    Field("rating_number", "float"),
)

# "$12.99", "12.99", "$1,299.00"; ranges ("$5 - $9") and text ("from $5") are not prices.
_PRICE = re.compile(r"\$?\s*(\d[\d,]*(?:\.\d+)?)")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_json_object(text):
    """The JSON object on one line; ``BadLine`` for invalid JSON or a non-object."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadLine(f"invalid JSON ({err.msg}: column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadLine("not a JSON object")
    return record


def optional(value):
    """``None`` for an absent value: null, or the string "None" that some meta lines carry."""
    if isinstance(value, str) and value.strip() == "None":
        return None
    return value


def parse_price(value):
    """Price as a float, or ``None`` when absent or not one plain amount."""
    value = optional(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    match = _PRICE.fullmatch(str(value).strip())
    return float(match.group(1).replace(",", "")) if match else None


def optional_number(value):
    """A number, or ``None`` when absent or not numeric (meta fields are never fatal)."""
    try:
        return parse_number(optional(value), "value")
    except BadLine:
        return None


def parse_review_line(text):
    """One review -> (user, item, rating, timestamp in ms)."""
    record = load_json_object(text)
    return (
        parse_id(record.get("user_id"), "user_id"),
        parse_id(record.get("parent_asin"), "parent_asin"),
        float(parse_number(record.get("rating"), "rating", *RATING_RANGE)),
        parse_integer(record.get("timestamp"), "timestamp", minimum=0),
    )


def parse_meta_line(text):
    """One meta record -> an ``.item`` row (see ``ITEM_FIELDS``); ``Repaired`` when a text had
    unpaired surrogates, which UTF-8 cannot encode (replaced by U+FFFD, never fatal)."""
    record = load_json_object(text)
    categories = optional(record.get("categories")) or []
    if isinstance(categories, str):
        categories = [categories]
    categories = [c for c in categories if optional(c) is not None]
    texts = {name: optional(record.get(name)) for name in ("title", "store", "main_category")}
    row = (
        parse_id(record.get("parent_asin"), "parent_asin"),
        clean_text(texts["title"]),
        clean_text(texts["store"]),
        as_token_seq(categories),
        as_float(parse_price(record.get("price"))),
        clean_text(texts["main_category"]),
        as_float(optional_number(record.get("average_rating"))),
        as_float(optional_number(record.get("rating_number"))),
    )
    texts["categories"] = " ".join(map(str, categories))
    damaged = [name for name, value in texts.items() if unpaired_surrogate(str(value))]
    if damaged:
        return Repaired(row, f"unpaired surrogates in {', '.join(damaged)} replaced by U+FFFD")
    return row


def convert_amazon2023(
    reviews, output_dir, name, meta=None, kcore=None, skip_bad_lines=False, progress=None
):
    """Convert a review file (and its meta file) into ``output_dir/name/name.inter`` (and
    ``name.item``). Meta items are written only if they have a written interaction."""
    progress = progress or Progress()
    if not _DATASET_NAME.fullmatch(name or ""):
        raise ConversionError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_', '-' (e.g. amazon-beauty)"
        )
    for path in (reviews, meta):
        if path is not None and not os.path.isfile(path):
            raise ConversionError(f"input file not found: {path}")
    policy = BadLinePolicy(skip=skip_bad_lines, progress=progress)

    log = InteractionLog(time_units_per_second=1000)
    for user, item, rating, timestamp in read_records(
        reviews, parse_review_line, policy, progress, ENCODING
    ):
        log.add(user, item, rating, timestamp)
    stats = log.finish(reviews, kcore=kcore)

    inter_name, item_name = f"{name}.inter", f"{name}.item"
    features = {}
    with AtomicOutput(
        os.path.join(output_dir, name), replaces=(inter_name, item_name, f"{name}.user")
    ) as output:
        rows = {inter_name: log.write(output, inter_name)}
        if meta is not None:
            items = output.open(item_name, ITEM_FIELDS)
            features[meta] = write_feature_rows(
                items, read_records(meta, parse_meta_line, policy, progress, ENCODING),
                log.has_item, "items", stats.items,
            )
            rows[item_name] = items.rows
    return ConversionReport(
        directory=output.directory,
        rows=rows,
        stats=stats,
        policy=policy,
        features=features,
        stale_removed=output.stale_removed,
    )
