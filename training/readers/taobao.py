"""Taobao UserBehavior (Alibaba Tianchi) -> canonical events.

    frame = read("data/taobao/UserBehavior.csv", session_gap_minutes=30.0, notes={})

Layout as distributed: `UserBehavior.csv`, no header, comma-separated
user_id,item_id,category_id,behavior_type,timestamp (unix seconds), behaviour
pv -> view, cart -> addtocart, buy -> transaction, fav -> dropped (a bookmark is
not one of our event types) and counted in notes["dropped_events"]["fav"].
`--input` is the file or its folder.

The release covers 2017-11-25..2017-12-03 (China time, UTC+8); the few rows outside
that period carry broken clocks (the sample has one from September) and are dropped,
counted as "outside_published_period", so they cannot distort the temporal split.

No session ids: sessions are cut per user at `session_gap_minutes` of inactivity,
measured on all behaviour including `fav` (the user was active), then `fav` rows
are dropped; a session of favourites only therefore disappears. No price.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from training.readers.common import (
    canonical, count_dropped, first_line, looks_like, require_rows, scan_rows, single_file)
from training.sessionize import sessionize

DATASET = "taobao"
COLUMNS = ("user", "item", "category", "behavior", "time")
BEHAVIOURS = {"pv": "view", "cart": "addtocart", "buy": "transaction"}
DROPPED_BEHAVIOURS = ("fav",)
# [2017-11-25 00:00, 2017-12-04 00:00) UTC+8, in unix seconds.
PERIOD_SECONDS = (1_511_539_200, 1_512_316_800)


def _fits(line: str) -> bool:
    fields = line.split(",")
    return len(fields) == 5 and fields[3] in (*BEHAVIOURS, *DROPPED_BEHAVIOURS) and fields[4].isdigit()


def _check(path: Path) -> None:
    # Most of the first lines, not just the first: one bad first row is a malformed row.
    if not looks_like(path, _fits):
        raise ClickscoreError(
            f"{path} does not look like Taobao UserBehavior.csv: expected 5 comma-separated fields without "
            f"header (user_id,item_id,category_id,behavior_type pv|cart|fav|buy,unix seconds), "
            f"first line is {first_line(path)[:80]!r}")


def read(input_path: str | Path, session_gap_minutes: float, notes: dict | None = None) -> pl.DataFrame:
    """UserBehavior.csv -> canonical events (original row order)."""
    path = single_file(input_path, "UserBehavior*.csv", DATASET)
    _check(path)
    schema = {"user": pl.Int64(), "item": pl.Int64(), "category": pl.Int64(), "behavior": pl.String(),
              "time": pl.Int64()}
    rows = (
        scan_rows(path, schema, header=False, names=COLUMNS, required=COLUMNS, notes=notes,
                  checks={"unknown_behavior_type": pl.col("behavior").is_in([*BEHAVIOURS, *DROPPED_BEHAVIOURS])})
        .rename({"_line": "_row"})
        .with_columns((pl.col("time") * 1000).alias("timestamp"))
    )
    in_period = pl.col("time").is_between(PERIOD_SECONDS[0], PERIOD_SECONDS[1], closed="left")
    count_dropped(notes, "outside_published_period", rows.select((~in_period).sum()).collect().item())
    rows = rows.filter(in_period)
    sessions = sessionize(rows, "user", session_gap_minutes, order_column="_row").collect()
    kept = sessions.filter(~pl.col("behavior").is_in(DROPPED_BEHAVIOURS))
    for behaviour in DROPPED_BEHAVIOURS:
        count_dropped(notes, behaviour, int((sessions["behavior"] == behaviour).sum()))
    del sessions
    frame = canonical(kept.lazy().sort("_row").with_columns(
        pl.col("behavior").replace_strict(BEHAVIOURS).alias("event_type"),
        pl.col("item").cast(pl.String).alias("item_id"),
        pl.col("category").cast(pl.String).alias("category_id"),
        pl.col("user").cast(pl.String).alias("user_id"),
    )).collect()
    return require_rows(frame, path, DATASET)
