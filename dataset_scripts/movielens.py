"""MovieLens-1M (``ratings.dat``, ``movies.dat``, ``users.dat``) to RecBole atomic files.

The ``.dat`` files are ``::``-separated; they are read as Latin-1 (``movies.dat`` has accented
titles; the other two are ASCII, a subset) and written as UTF-8.
"""
import os
import re

from .atomic import (
    AtomicOutput,
    BadLine,
    BadLinePolicy,
    ConversionError,
    Field,
    Progress,
    as_token_seq,
    clean_text,
    parse_integer,
    parse_number,
    read_records,
    write_feature_rows,
)
from .interactions import ConversionReport, InteractionLog

DATASET = "ml-1m"
RATINGS, MOVIES, USERS = "ratings.dat", "movies.dat", "users.dat"
RATING_COLUMNS = ("UserID", "MovieID", "Rating", "Timestamp")
MOVIE_COLUMNS = ("MovieID", "Title", "Genres")
USER_COLUMNS = ("UserID", "Gender", "Age", "Occupation", "Zip-code")

ITEM_FIELDS = (
    Field("item_id", "token"),
    Field("movie_title", "token_seq"),
    Field("release_year", "token"),
    Field("genre", "token_seq"),
)
USER_FIELDS = (
    Field("user_id", "token"),
    Field("age", "token"),
    Field("gender", "token"),
    Field("occupation", "token"),
    Field("zip_code", "token"),
)

_YEAR = re.compile(r"\((\d{4})\)")


def split_dat_line(raw, columns):
    """The cleaned ``::``-separated values of one line; ``BadLine`` unless there are exactly
    ``len(columns)`` of them."""
    values = raw.decode("latin-1").rstrip("\r\n").split("::")
    if len(values) != len(columns):
        raise BadLine(
            f"expected {len(columns)} '::'-separated fields ({'::'.join(columns)}), "
            f"found {len(values)}"
        )
    return [clean_text(value) for value in values]


def _require(value, column):
    if not value:
        raise BadLine(f"empty {column}")
    return value


def split_title_year(title):
    """Title without its last ``(YYYY)``, and that year ("" when there is none).

    ``"City of Lost Children, The (Cité des enfants perdus, La) (1995)"`` gives
    ``("City of Lost Children, The (Cité des enfants perdus, La)", "1995")``.
    """
    matches = list(_YEAR.finditer(title))
    if not matches:
        return clean_text(title), ""
    last = matches[-1]
    return clean_text(title[: last.start()] + title[last.end() :]), last.group(1)


def parse_rating_line(raw):
    """``UserID::MovieID::Rating::Timestamp`` -> (user, item, rating, timestamp in seconds)."""
    user, item, rating, timestamp = split_dat_line(raw, RATING_COLUMNS)
    return (
        _require(user, "UserID"),
        _require(item, "MovieID"),
        float(parse_number(rating, "Rating")),
        parse_integer(timestamp, "Timestamp"),
    )


def parse_movie_line(raw):
    """``MovieID::Title::Genres`` -> an ``.item`` row."""
    item, title, genres = split_dat_line(raw, MOVIE_COLUMNS)
    title, year = split_title_year(title)
    return (_require(item, "MovieID"), title, year, as_token_seq(genres.split("|")))


def parse_user_line(raw):
    """``UserID::Gender::Age::Occupation::Zip-code`` -> a ``.user`` row."""
    user, gender, age, occupation, zip_code = split_dat_line(raw, USER_COLUMNS)
    return (_require(user, "UserID"), age, gender, occupation, zip_code)


def convert_ml1m(input_dir, output_dir, kcore=None, skip_bad_lines=False, progress=None):
    """Convert the MovieLens-1M files in ``input_dir`` into ``output_dir/ml-1m/ml-1m.{inter,
    item,user}``. Movies and users are written only if they have a written rating."""
    progress = progress or Progress()
    if not os.path.isdir(input_dir):
        raise ConversionError(f"input directory not found: {input_dir}")
    paths = {name: os.path.join(input_dir, name) for name in (RATINGS, MOVIES, USERS)}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise ConversionError(f"input file not found: {', '.join(missing)}")
    policy = BadLinePolicy(skip=skip_bad_lines, progress=progress)

    log = InteractionLog(time_units_per_second=1)
    for user, item, rating, timestamp in read_records(
        paths[RATINGS], parse_rating_line, policy, progress
    ):
        log.add(user, item, rating, timestamp)
    stats = log.finish(paths[RATINGS], kcore=kcore)

    directory = os.path.join(output_dir, DATASET)
    names = {suffix: f"{DATASET}.{suffix}" for suffix in ("inter", "item", "user")}
    repeated = {}
    with AtomicOutput(directory, replaces=names.values()) as output:
        rows = {names["inter"]: log.write(output, names["inter"])}
        items = output.open(names["item"], ITEM_FIELDS)
        repeated[paths[MOVIES]] = write_feature_rows(
            items, read_records(paths[MOVIES], parse_movie_line, policy, progress), log.has_item
        )
        users = output.open(names["user"], USER_FIELDS)
        repeated[paths[USERS]] = write_feature_rows(
            users, read_records(paths[USERS], parse_user_line, policy, progress), log.has_user
        )
        rows[names["item"]] = items.rows
        rows[names["user"]] = users.rows
    return ConversionReport(
        directory=output.directory,
        rows=rows,
        stats=stats,
        skipped_lines=dict(policy.skipped),
        repeated_ids=repeated,
        skip_bad_lines=skip_bad_lines,
    )
