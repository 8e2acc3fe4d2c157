"""MovieLens-1M (``ratings.dat``, ``movies.dat``, ``users.dat``) to RecBole atomic files.

The ``.dat`` files are ``::``-separated; they are read as Latin-1 by default (``movies.dat`` has
accented titles; the other two are ASCII, a subset), or UTF-8, and written as UTF-8.
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
ML1M_ENCODINGS = ("latin-1", "utf-8")  # the first is the published files' encoding
RATING_RANGE = (1, 5)  # whole stars in the published data
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
_ID = re.compile(r"[0-9]+")


def split_dat_line(text, columns):
    """The ``::``-separated values of one line; ``BadLine`` unless there are exactly
    ``len(columns)`` of them."""
    values = text.split("::")
    if len(values) != len(columns):
        raise BadLine(
            f"expected {len(columns)} '::'-separated fields ({'::'.join(columns)}), "
            f"found {len(values)}"
        )
    return values


def parse_movielens_id(value, column):
    """A MovieLens id: decimal digits, written without leading zeros (so that ``01`` in one file
    and ``1`` in another are the same id); ``BadLine`` otherwise."""
    if not value:
        raise BadLine(f"empty {column}")
    if not _ID.fullmatch(value):
        raise BadLine(f"{column} {value!r} is not a whole number")
    return str(int(value))


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


def parse_rating_line(text):
    """``UserID::MovieID::Rating::Timestamp`` -> (user, item, rating, timestamp in seconds)."""
    user, item, rating, timestamp = split_dat_line(text, RATING_COLUMNS)
    return (
        parse_movielens_id(user, "UserID"),
        parse_movielens_id(item, "MovieID"),
        float(parse_number(rating, "Rating", *RATING_RANGE)),
        parse_integer(timestamp, "Timestamp", minimum=0),
    )


def parse_movie_line(text):
    """``MovieID::Title::Genres`` -> an ``.item`` row."""
    item, title, genres = split_dat_line(text, MOVIE_COLUMNS)
    title, year = split_title_year(clean_text(title))
    return (parse_movielens_id(item, "MovieID"), title, year, as_token_seq(genres.split("|")))


def parse_user_line(text):
    """``UserID::Gender::Age::Occupation::Zip-code`` -> a ``.user`` row."""
    user, *features = split_dat_line(text, USER_COLUMNS)
    gender, age, occupation, zip_code = (clean_text(value) for value in features)
    return (parse_movielens_id(user, "UserID"), age, gender, occupation, zip_code)


def convert_ml1m(input_dir, output_dir, kcore=None, skip_bad_lines=False, progress=None,
                 encoding=ML1M_ENCODINGS[0]):
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

    def records(name, parse_line):
        return read_records(paths[name], parse_line, policy, progress, encoding)

    log = InteractionLog(time_units_per_second=1)
    for user, item, rating, timestamp in records(RATINGS, parse_rating_line):
        log.add(user, item, rating, timestamp)
    stats = log.finish(paths[RATINGS], kcore=kcore)

    directory = os.path.join(output_dir, DATASET)
    names = {suffix: f"{DATASET}.{suffix}" for suffix in ("inter", "item", "user")}
    features = {}
    with AtomicOutput(directory, replaces=names.values()) as output:
        rows = {names["inter"]: log.write(output, names["inter"])}
        for suffix, fields, source, parse_line, wanted, kind, expected in (
            ("item", ITEM_FIELDS, MOVIES, parse_movie_line, log.has_item, "movies", stats.items),
            ("user", USER_FIELDS, USERS, parse_user_line, log.has_user, "users", stats.users),
        ):
            writer = output.open(names[suffix], fields)
            features[paths[source]] = write_feature_rows(
                writer, records(source, parse_line), wanted, kind, expected
            )
            rows[names[suffix]] = writer.rows
    return ConversionReport(
        directory=output.directory,
        rows=rows,
        stats=stats,
        policy=policy,
        features=features,
        stale_removed=output.stale_removed,
    )
