"""OTTO session dataset (otto-de/recsys-dataset) -> canonical events.

    frame = read("data/otto/train.jsonl", notes={})

Layout as distributed: JSON lines, one session a line:
`{"session": 0, "events": [{"aid": 1517085, "ts": 1659304800025, "type": "clicks"}, ...]}`
with type clicks -> view, carts -> addtocart, orders -> transaction. `ts` is epoch ms
in the official release; some re-releases (the Kaggle "otto-full-optimized" files)
store seconds, so a log whose largest ts is below 10^11 (year 1973 in ms, year 5138
in seconds) is read as seconds. `--input` is the file, or a folder with one *.jsonl.
No category, no price, no user.

Bad lines (not JSON, values of the wrong type, blank) and bad events (no aid, no ts,
an unknown type) are left out and reported with their line number; a line's other
events are kept.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from training.readers.common import (
    canonical, first_line, json_lines, looks_like, report_malformed, require_rows, single_file)

DATASET = "otto"
EVENT_TYPES = {"clicks": "view", "carts": "addtocart", "orders": "transaction"}
SECONDS_BELOW = 10**11
SCHEMA = {"session": pl.Int64, "events": pl.List(pl.Struct({"aid": pl.Int64, "ts": pl.Int64, "type": pl.String}))}


def read(input_path: str | Path, notes: dict | None = None) -> pl.DataFrame:
    """OTTO JSON lines -> canonical events (sessions and events in file order)."""
    path = single_file(input_path, "*.jsonl", DATASET)
    head = first_line(path)
    # Most of the first lines, not just the first: one bad first line is a malformed row.
    if not looks_like(path, lambda line: line.lstrip().startswith("{") and '"session"' in line and '"events"' in line):
        raise ClickscoreError(f"{path} does not look like OTTO JSON lines "
                              '({"session": ..., "events": [{"aid", "ts", "type"}]}); '
                              f"first line is {head[:80]!r}")
    sessions = json_lines(path, pl.Struct(SCHEMA), notes)
    # One row per event, numbered by its session's line; a session without events has none.
    rows = (sessions.filter(pl.col("events").list.len().fill_null(1) > 0)
            .explode("events").unnest("events"))
    reason = (pl.when(pl.col("session").is_null()).then(pl.lit("missing_session"))
              .when(pl.col("aid").is_null()).then(pl.lit("missing_aid"))
              .when(pl.col("ts").is_null()).then(pl.lit("missing_ts"))
              .when(~pl.col("type").is_in(list(EVENT_TYPES)).fill_null(False)).then(pl.lit("unknown_event_type"))
              .otherwise(None))
    rows = rows.with_columns(reason.alias("_reason"))
    report_malformed(notes, path, rows.filter(pl.col("_reason").is_not_null()).select("_line", "_reason"))
    rows = rows.filter(pl.col("_reason").is_null())
    in_seconds = rows.height > 0 and rows["ts"].max() < SECONDS_BELOW
    if notes is not None:
        notes["ts_unit"] = "s" if in_seconds else "ms"
    frame = canonical(rows.with_columns(
        pl.col("session").cast(pl.String).alias("session_id"),
        pl.col("type").replace_strict(EVENT_TYPES).alias("event_type"),
        pl.col("aid").cast(pl.String).alias("item_id"),
        (pl.col("ts") * 1000 if in_seconds else pl.col("ts")).alias("timestamp"),
    )).collect()
    return require_rows(frame, path, DATASET)
