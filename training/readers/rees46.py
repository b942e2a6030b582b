"""REES46 "eCommerce behavior data from multi category store" -> canonical events.

    frame = read("data/rees46/", notes={})

Layout as distributed: monthly CSVs (`2019-Oct.csv`, `2019-Nov.csv`, ...) with header
event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session;
`event_time` like `2019-10-01 00:00:00 UTC`. `--input` is one file or a folder of them.
- event_type view -> view, cart -> addtocart, purchase -> transaction;
  remove_from_cart is dropped (not one of our event types) and counted.
- session = user_session; rows without one are dropped and counted.
- price 0 -> null (the contract has no free prices); a negative price is a malformed row.
- category_code and brand are not in the contract.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from training.readers.common import (canonical, check_header, count_dropped, folder_of, guess_dataset,
                                     require_rows, scan_rows)

DATASET = "rees46"
COLUMNS = ("event_time", "event_type", "product_id", "category_id", "category_code", "brand",
           "price", "user_id", "user_session")
EVENT_TYPES = {"view": "view", "cart": "addtocart", "purchase": "transaction"}
DROPPED_EVENT_TYPES = ("remove_from_cart",)


def _input_files(input_path: str | Path) -> list[Path]:
    folder, given = folder_of(input_path)
    if given is not None:
        return [given]
    files = sorted(folder.glob("*.csv"))
    if not files:
        hint = guess_dataset(folder)
        raise ClickscoreError(f"--dataset rees46: no monthly *.csv in {folder}"
                              + (f"; this looks like --dataset {hint}" if hint else ""))
    return files


def read(input_path: str | Path, notes: dict | None = None) -> pl.DataFrame:
    """One or more monthly CSVs -> canonical events (files in name order, rows in file order)."""
    files = _input_files(input_path)
    for path in files:
        check_header(path, COLUMNS, dataset=DATASET)
    time_format = "%Y-%m-%d %H:%M:%S UTC"
    rows = pl.concat([
        scan_rows(path, {
            "event_time": pl.String(), "event_type": pl.String(), "product_id": pl.Int64(),
            "category_id": pl.String(), "category_code": pl.String(), "brand": pl.String(),
            "price": pl.Float64(), "user_id": pl.Int64(), "user_session": pl.String()},
            required=("event_time", "event_type", "product_id"), notes=notes,
            checks={"unknown_event_type": pl.col("event_type").is_in([*EVENT_TYPES, *DROPPED_EVENT_TYPES]),
                    "bad_price": pl.col("price").is_null() | (pl.col("price").is_finite() & (pl.col("price") >= 0)),
                    "bad_event_time": pl.col("event_time").str.to_datetime(
                        time_format, time_unit="ms", time_zone="UTC", strict=False).is_not_null()})
        .select("event_time", "event_type", "product_id", "category_id", "price", "user_id", "user_session")
        for path in files
    ])
    counts = rows.group_by("event_type").agg(
        pl.len().alias("events"), pl.col("user_session").null_count().alias("no_session")).collect()
    for event_type, events, no_session in counts.iter_rows():
        if event_type in DROPPED_EVENT_TYPES:
            count_dropped(notes, event_type, events)
        else:
            count_dropped(notes, "missing_user_session", no_session)
    if notes is not None:
        notes["files"] = [p.name for p in files]
    frame = canonical(
        rows.filter(pl.col("event_type").is_in(list(EVENT_TYPES)) & pl.col("user_session").is_not_null())
        .with_columns(
            pl.col("user_session").alias("session_id"),
            pl.col("event_type").replace_strict(EVENT_TYPES),
            pl.col("product_id").cast(pl.String).alias("item_id"),
            pl.when(pl.col("price").is_finite() & (pl.col("price") > 0)).then(pl.col("price")).otherwise(None).alias("price"),
            pl.col("event_time").str.to_datetime(time_format, time_unit="ms", time_zone="UTC")
            .dt.epoch("ms").alias("timestamp"),
            pl.col("user_id").cast(pl.String),
        )
    ).collect(engine="streaming")
    return require_rows(frame, files[0], DATASET)
