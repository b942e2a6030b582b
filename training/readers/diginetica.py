"""Diginetica (CIKM Cup 2016, track 2) -> canonical events.

    frame = read("data/diginetica/", notes={})

Layout as distributed (`;`-separated, with header; `--input` is the folder or the
views file):
- `train-item-views.csv` (or the head `sample_train-item-views.csv`):
  session_id;user_id;item_id;timeframe;eventdate -> `view` events. user_id "NA" -> null.
- `train-purchases.csv`: sessionId;userId;timeframe;eventdate;ordernumber;itemId
  -> `transaction` events. Purchases of sessions without views in the views file
  are dropped (a sample of the views has only some sessions) and counted in
  notes["dropped_purchases_without_views"].
- `product-categories.csv` (optional): itemId;categoryId -> category_id.
No price (products.csv has only a log2 price bucket), no event id (ordernumber
names an order, shared by its items).

Time: `timeframe` is ms since the session's start, `eventdate` the day of the event
itself, and the session's start time of day is not published. We use
timestamp = (the session's first view day, 00:00 UTC) + timeframe. For a session
within one day that is eventdate + timeframe; adding timeframe to each event's own
eventdate instead would push events after midnight a day late, and purchases (whose
timeframe counts from the session start, up to months earlier) far into the future:
session 447 views on 2016-02-02, buys on 2016-04-24 with timeframe 82.08 days.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from training.readers.common import (
    MS_PER_DAY, canonical, check_header, find_file, folder_of, require_rows, scan_rows)

DATASET = "diginetica"
VIEW_FILES = ("train-item-views.csv", "sample_train-item-views.csv")
VIEW_COLUMNS = ("session_id", "user_id", "item_id", "timeframe", "eventdate")
PURCHASE_COLUMNS = ("sessionId", "userId", "timeframe", "eventdate", "ordernumber", "itemId")


def _timestamp() -> pl.Expr:
    """Session's first view day at 00:00 UTC + timeframe (see the module docstring)."""
    day = pl.col("eventdate").str.to_date("%Y-%m-%d").cast(pl.Int64) * MS_PER_DAY
    first_view_day = day.filter(pl.col("event_type") == "view").min().over("session")
    return (first_view_day + pl.col("timeframe")).alias("timestamp")


def _user() -> pl.Expr:
    return pl.when(pl.col("user").is_in(["NA", ""])).then(None).otherwise(pl.col("user")).alias("user_id")


def read(input_path: str | Path, notes: dict | None = None) -> pl.DataFrame:
    """Views (+ purchases, + categories) -> canonical events, views first."""
    folder, given = folder_of(input_path)
    views_path = given if given is not None and given.name in VIEW_FILES else find_file(folder, VIEW_FILES, DATASET)
    check_header(views_path, VIEW_COLUMNS, separator=";", dataset=DATASET)
    date_ok = {"bad_eventdate": pl.col("eventdate").str.to_date("%Y-%m-%d", strict=False).is_not_null(),
               "bad_timeframe": pl.col("timeframe") >= 0}
    views = scan_rows(views_path, {
        "session_id": pl.Int64(), "user_id": pl.String(), "item_id": pl.Int64(),
        "timeframe": pl.Int64(), "eventdate": pl.String()}, separator=";",
        required=("session_id", "item_id", "timeframe", "eventdate"), checks=date_ok, notes=notes,
    ).select(
        pl.col("session_id").alias("session"), pl.lit("view").alias("event_type"),
        pl.col("item_id").alias("item"), pl.col("user_id").alias("user"), "timeframe", "eventdate")
    parts = [views]
    purchases_path = find_file(folder, ["train-purchases.csv"], DATASET, required=False)
    if purchases_path is not None:
        check_header(purchases_path, PURCHASE_COLUMNS, separator=";", dataset=DATASET)
        purchases = scan_rows(purchases_path, {
            "sessionId": pl.Int64(), "userId": pl.String(), "timeframe": pl.Int64(), "eventdate": pl.String(),
            "ordernumber": pl.Int64(), "itemId": pl.Int64()}, separator=";",
            required=("sessionId", "timeframe", "eventdate", "itemId"), checks=date_ok, notes=notes,
        ).select(
            pl.col("sessionId").alias("session"), pl.lit("transaction").alias("event_type"),
            pl.col("itemId").alias("item"), pl.col("userId").alias("user"), "timeframe", "eventdate")
        viewed = views.select(pl.col("session").unique())
        kept = purchases.join(viewed, on="session", how="semi", maintain_order="left")
        if notes is not None:
            total = purchases.select(pl.len()).collect().item()
            notes["dropped_purchases_without_views"] = int(total - kept.select(pl.len()).collect().item())
        parts.append(kept)
    elif notes is not None:
        notes.setdefault("warnings", []).append(
            f"no train-purchases.csv beside {views_path.name}: no transaction events, no buy labels")
    events = pl.concat(parts)
    categories_path = find_file(folder, ["product-categories.csv"], DATASET, required=False)
    if categories_path is not None:
        check_header(categories_path, ("itemId", "categoryId"), separator=";", dataset=DATASET)
        categories = scan_rows(categories_path, {"itemId": pl.Int64(), "categoryId": pl.String()},
                               separator=";", required=("itemId", "categoryId"), notes=notes,
                               ).select("itemId", "categoryId").unique("itemId", keep="last", maintain_order=True)
        events = events.join(categories, left_on="item", right_on="itemId", how="left", maintain_order="left")
    frame = canonical(events.with_columns(
        pl.col("session").cast(pl.String).alias("session_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
        _user(),
        _timestamp(),
        *([pl.col("categoryId").alias("category_id")] if categories_path is not None else []),
    )).collect()
    return require_rows(frame, views_path, DATASET)
