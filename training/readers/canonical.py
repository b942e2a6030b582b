"""The canonical format itself (CSV, Parquet or JSON lines) -> validated canonical events.

    frame, split = read("data/sim.parquet", notes={})

Columns as in docs/CONTRACTS.md: session_id, event_type, item_id, timestamp required;
category_id, price, user_id, event_id, split optional. Values follow the click-event
contract (stream/events.py), and this reader uses its functions so that a file that
prepares cleanly also streams cleanly: event types go through normalise_event_type
(so `click`, `cart`, `buy` ... are accepted), timestamps are epoch ms integers or
ISO-8601 strings (parse_timestamp), prices must be finite and >= 0. A row that breaks
these rules (or a blank line, a CSV line with too many/few fields, a JSON line that does
not parse) is left out and reported with its line number (row number for Parquet);
a missing required column or an unreadable file stops with a ClickscoreError. In JSON
lines, the keys of the first 20 non-blank lines name the columns. A CSV line with an
unbalanced quote is blanked before parsing (`unbalanced_quote`), so it cannot swallow
the lines after it.
A `split` column (train|valid|test, one value per session) is returned as the
published split; a column of nulls only means "no split"; in a filled one, a row
without a valid split is a malformed row (`bad_split`).
"""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from stream.events import (
    MAX_ID_CHARS, MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, InvalidEvent, normalise_event_type, parse_timestamp)
from training.readers.common import (
    CANONICAL_SCHEMA, canonical, first_line, folder_of, head_lines, json_lines, raw_rows, report_malformed,
    require_rows)

DATASET = "canonical"
REQUIRED = ("session_id", "event_type", "item_id", "timestamp")
OPTIONAL = ("category_id", "price", "user_id", "event_id", "split")
ID_COLUMNS = ("session_id", "item_id", "category_id", "user_id", "event_id")
SPLITS = ("train", "valid", "test")


def _load(path: Path, notes: dict | None) -> pl.DataFrame:
    """The file's columns plus `_line` (file line; row number for Parquet) and `_reason`
    (a structural problem of the row: blank line, too many/few fields, not JSON)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pl.read_parquet(path)
            return frame.with_row_index("_line", offset=1).with_columns(pl.lit(None, pl.String).alias("_reason"))
        if suffix == ".csv":
            # Everything as text: ids must not become floats, and the checks below
            # report bad values instead of a parser error.
            names = [n.strip().strip('"') for n in first_line(path).split(",")]
            try:
                return raw_rows(path, names, quote_char='"').collect()
            except pl.exceptions.ComputeError:
                return _csv_without_unbalanced_quotes(path, names)
        if suffix in (".jsonl", ".ndjson", ".json"):
            # Values as text, checked below like CSV ones; which columns the file has
            # is read from its first line.
            names: list[str] = []
            for line in head_lines(path):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue        # reported with its line number by json_lines
                if isinstance(record, dict):
                    names += [name for name in record if name not in names]
            known = [*REQUIRED, *OPTIONAL]
            dtype = pl.Struct({n: pl.String for n in dict.fromkeys([*known, *names])})
            frame = json_lines(path, dtype, notes).with_columns(
                pl.lit(None, pl.String).alias("_reason"))
            return frame.select([c for c in frame.columns if c in names or c in ("_line", "_reason")])
    except pl.exceptions.PolarsError as exc:
        raise ClickscoreError(f"{path}: cannot read as {suffix[1:]} ({str(exc).splitlines()[0]})") from None
    raise ClickscoreError(f"--dataset canonical: {path} must be .csv, .parquet or .jsonl")


def _csv_without_unbalanced_quotes(path: Path, names: list[str]) -> pl.DataFrame:
    """A CSV the quote-aware parser rejects: its lines with an odd number of `"` (a stray
    quote, or a quoted field spanning lines) are blanked, so the other lines keep their
    numbers, parsed, and reported as `unbalanced_quote`."""
    lines = pl.read_csv(path, has_header=False, separator="\x1f", quote_char=None, encoding="utf8-lossy",
                        schema={"_text": pl.String}, truncate_ragged_lines=True)["_text"].fill_null("")
    odd = (lines.str.count_matches('"', literal=True) % 2 == 1).rename("_odd")
    cleaned = pl.select(pl.when(pl.lit(odd)).then(pl.lit("")).otherwise(pl.lit(lines)))["literal"]
    source = (cleaned.str.join("\n").item() + "\n").encode()
    frame = raw_rows(path, names, quote_char='"', source=source).collect()
    flags = pl.DataFrame({"_line": pl.Series(range(1, len(odd) + 1), dtype=pl.UInt32), "_odd": odd})
    return frame.join(flags, on="_line", how="left", maintain_order="left").with_columns(
        pl.when(pl.col("_odd")).then(pl.lit("unbalanced_quote")).otherwise(pl.col("_reason")).alias("_reason")
    ).drop("_odd")


class RowProblems:
    """The first problem of each row (null where the row is fine): bad values drop
    their row and are reported with its line, they do not stop the preparation."""

    def __init__(self, reasons: pl.Series):
        self.reasons = reasons.alias("_reason")

    def mark(self, bad: pl.Series, reason: str) -> None:
        bad = bad.fill_null(False)
        if bad.any():
            self.reasons = pl.select(
                pl.when(pl.lit(bad) & pl.lit(self.reasons).is_null()).then(pl.lit(reason))
                .otherwise(pl.lit(self.reasons)).alias("_reason"))["_reason"]


def _identifiers(frame: pl.DataFrame, problems: RowProblems) -> pl.DataFrame:
    for column in ID_COLUMNS:
        if column not in frame.columns:
            continue
        dtype = frame.schema[column]
        if not (dtype == pl.String or dtype.is_integer() or dtype == pl.Null):
            raise ClickscoreError(f"column {column!r} has type {dtype}; ids must be strings or integers")
        text = frame[column].cast(pl.String)
        if column in REQUIRED:
            problems.mark(text.is_null() | (text.str.strip_chars() == ""), f"missing_{column}")
        problems.mark(text.str.len_chars().fill_null(0) > MAX_ID_CHARS, f"oversized_{column}")
        frame = frame.with_columns(text.alias(column))
    return frame


def _event_types(frame: pl.DataFrame, problems: RowProblems) -> pl.Series:
    values = frame["event_type"].cast(pl.String)
    problems.mark(values.is_null(), "missing_event_type")
    mapping: dict[str, str] = {}
    for value in values.drop_nulls().unique().to_list():
        try:
            mapping[value] = normalise_event_type(value)
        except InvalidEvent:
            problems.mark(values == value, "unknown_event_type")
    return values.replace_strict(mapping, default=None, return_dtype=pl.String)


def _timestamps(frame: pl.DataFrame, problems: RowProblems) -> pl.Series:
    column = frame["timestamp"]
    fix = "use UTC epoch milliseconds or ISO-8601 strings"
    if isinstance(column.dtype, pl.Datetime):
        millis = column.dt.epoch("ms")
    elif column.dtype.is_integer():
        millis = column.cast(pl.Int64)
    elif column.dtype.is_float():
        problems.mark(~column.is_finite() | (column != column.floor()), "bad_timestamp")
        millis = pl.select(pl.when(column.is_finite()).then(pl.lit(column)).cast(pl.Int64))[column.name]
    elif column.dtype == pl.String:
        mapping: dict[str, int] = {}
        for text in column.drop_nulls().unique().to_list():
            stripped = text.strip()
            try:
                # Digits are epoch ms (parse_timestamp takes ints); anything else ISO-8601.
                mapping[text] = parse_timestamp(int(stripped) if stripped.lstrip("-").isdigit() else stripped)
            except InvalidEvent as exc:
                problems.mark(column == text, exc.reason if exc.reason == "timestamp_out_of_range"
                              else "bad_timestamp")
        millis = column.replace_strict(mapping, default=None, return_dtype=pl.Int64)
    else:
        raise ClickscoreError(f"column 'timestamp' has type {column.dtype}; {fix}")
    problems.mark(millis.is_null(), "missing_timestamp")
    problems.mark((millis < MIN_TIMESTAMP_MS) | (millis >= MAX_TIMESTAMP_MS), "timestamp_out_of_range")
    return millis


def _prices(frame: pl.DataFrame, problems: RowProblems) -> pl.Series:
    column = frame["price"]
    if column.dtype == pl.String:
        text = column.str.strip_chars().replace("", None)
        numbers = text.cast(pl.Float64, strict=False)
        problems.mark(numbers.is_null() & text.is_not_null(), "bad_price")
    elif column.dtype.is_numeric() or column.dtype == pl.Null:
        numbers = column.cast(pl.Float64)
    else:
        raise ClickscoreError(f"column 'price' has type {column.dtype}; prices must be numbers")
    problems.mark(~numbers.is_finite().fill_null(True), "bad_price")
    problems.mark((numbers < 0).fill_null(False), "bad_price")
    return numbers


def _published_split(frame: pl.DataFrame, path: Path) -> pl.DataFrame | None:
    split = frame["split"].cast(pl.String)
    if split.null_count() == frame.height:
        return None
    bad = frame.filter(split.is_null() | ~split.is_in(list(SPLITS)))
    if bad.height:
        raise ClickscoreError(f"{path}: {bad.height} row(s) have a split other than {list(SPLITS)} "
                              f"(first: session {bad['session_id'][0]!r}); give every row train, valid or "
                              "test, or drop the column to split by time")
    per_session = pl.DataFrame({"session_id": frame["session_id"], "split": split}).unique(maintain_order=True)
    mixed = per_session.filter(pl.col("session_id").is_duplicated())
    if mixed.height:
        raise ClickscoreError(f"{path}: session {mixed['session_id'][0]!r} has rows in several splits "
                              f"({sorted(set(mixed.filter(pl.col('session_id') == mixed['session_id'][0])['split']))}); "
                              "a session must sit in exactly one split")
    return per_session


def read(input_path: str | Path, notes: dict | None = None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """A canonical CSV/Parquet/JSON-lines file -> (validated events, published split or None)."""
    _, path = folder_of(input_path)
    if path is None:
        raise ClickscoreError(f"--dataset canonical: --input must be a .csv, .parquet or .jsonl file, "
                              f"{input_path} is a folder")
    frame = _load(path, notes)
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        columns = [c for c in frame.columns if c not in ("_line", "_reason")]
        raise ClickscoreError(
            f"{path} lacks column(s) {missing} (it has {columns[:12]}); the canonical format needs "
            f"{list(REQUIRED)} and optionally {list(OPTIONAL)} (see docs/data.md)")
    extra = [name for name in frame.columns if name not in CANONICAL_SCHEMA and name not in ("split", "_line", "_reason")]
    if extra and notes is not None:
        notes.setdefault("warnings", []).append(f"ignored column(s) not in the canonical format: {extra}")
    problems = RowProblems(frame["_reason"])
    frame = _identifiers(frame, problems)
    frame = frame.with_columns(_event_types(frame, problems).alias("event_type"),
                               _timestamps(frame, problems).alias("timestamp"))
    if "price" in frame.columns:
        frame = frame.with_columns(_prices(frame, problems).alias("price"))
    if "split" in frame.columns:
        split = frame["split"].cast(pl.String).str.strip_chars().replace("", None)
        if split.null_count() < frame.height:    # a filled split column: every row needs one
            problems.mark(split.is_null() | ~split.is_in(list(SPLITS)), "bad_split")
        frame = frame.with_columns(split.alias("split"))
    frame = frame.with_columns(problems.reasons)
    bad = frame.filter(pl.col("_reason").is_not_null())
    if bad.height:
        # Text formats report file lines (a CSV header is line 1); Parquet its row numbers.
        report_malformed(notes, path, bad.select("_line", "_reason"),
                         text_lines=path.suffix.lower() != ".parquet")
        frame = frame.filter(pl.col("_reason").is_null())
    frame = frame.drop("_line", "_reason")
    published = _published_split(frame, path) if "split" in frame.columns else None
    return require_rows(canonical(frame).collect(), path, DATASET), published
