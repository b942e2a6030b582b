"""`clickscore prepare`: a public click log -> the canonical prepared folder.

    clickscore prepare --dataset yoochoose --input ../shared/datasets/yoochoose-100k --out data/yoochoose-100k
    clickscore prepare --dataset yoochoose --input ../shared/datasets/yoochoose-100k \
        --buys ../shared/datasets/yoochoose-raw/yoochoose-buys.dat --complete-buys-below 22000 --out data/yoochoose-buys
    clickscore prepare --dataset rees46 --input ../shared/datasets/rees46/2019-Oct-head.csv --split random --out data/rees46

Reads the dataset in its published layout (training/readers/), drops what the
contract cannot hold (counted, never silently), orders rows by session start, then
timestamp, then input order, assigns whole sessions to train/valid/test
(training/split.py), and writes DIR/events.parquet and DIR/stats.json as specified
in docs/CONTRACTS.md; the stats are also printed as a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from stream.errors import ClickscoreError
from stream.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from training import readers
from training.readers.common import CANONICAL_SCHEMA, count_dropped
from training.split import SPLITS, SplitResult, published_split, random_split, session_table, temporal_split

DEFAULT_TEST_DAYS = {"yoochoose": 1.0}   # its public test set is the last day
FALLBACK_TEST_DAYS = 7.0
SESSIONISED = ("retailrocket", "taobao")
REQUIRED = ("session_id", "event_type", "item_id", "timestamp")
COLUMNS = (*CANONICAL_SCHEMA, "split")
TABLE_COLUMNS = ("events", "sessions", "items", "buying_sessions", "buy_share", "first_event", "last_event")


def iso(millis: int | None) -> str | None:
    """Epoch ms -> ISO-8601 UTC with ms and a Z, as stats.json writes times."""
    if millis is None:
        return None
    moment = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def drop_invalid(events: pl.DataFrame, notes: dict) -> pl.DataFrame:
    """Drop rows the event contract would reject (no id, timestamp out of range), counted."""
    missing = pl.any_horizontal([pl.col(name).is_null() for name in REQUIRED])
    out_of_range = (pl.col("timestamp") < MIN_TIMESTAMP_MS) | (pl.col("timestamp") >= MAX_TIMESTAMP_MS)
    counts = events.select(missing.sum().alias("missing"), (~missing & out_of_range).sum().alias("range")).row(0)
    count_dropped(notes, "missing_field", counts[0])
    count_dropped(notes, "timestamp_out_of_range", counts[1])
    if counts[0] or counts[1]:
        events = events.filter(~missing & ~out_of_range)
    return events


def choose_split(sessions: pl.DataFrame, published: pl.DataFrame | None,
                 test_days: float, valid_days: float) -> SplitResult:
    """The published split if the input has one, else the temporal split."""
    if published is not None:
        return published_split(sessions, published, valid_days)
    return temporal_split(sessions, test_days, valid_days)


def ordered(events: pl.DataFrame, row_order: np.ndarray, split: SplitResult) -> pl.DataFrame:
    """Events with `split`, ordered by session start, then timestamp, then input order.

    `row_order` is each event's session position (split.session_table) and
    `split.splits` lists the sessions in that same order, so both are plain array
    lookups: no join on string keys.
    """
    split_code = split.splits["split"].replace_strict({name: i for i, name in enumerate(SPLITS)},
                                                       return_dtype=pl.UInt8).to_numpy()
    split_column = pl.Series("split", split_code[row_order]).replace_strict(
        dict(enumerate(SPLITS)), return_dtype=pl.String)
    positions = pl.DataFrame({"order": row_order, "timestamp": events["timestamp"]}).with_row_index("_row")
    permutation = positions.select(pl.arg_sort_by("order", "timestamp", "_row")).to_series()
    return events.with_columns(split_column).select(COLUMNS)[permutation]


def _summary_columns() -> list[pl.Expr]:
    return [
        pl.len().alias("events"),
        pl.col("session_id").n_unique().alias("sessions"),
        pl.col("item_id").n_unique().alias("items"),
        pl.col("session_id").filter(pl.col("event_type") == "transaction").n_unique().alias("buying_sessions"),
        pl.col("timestamp").min().alias("first"),
        pl.col("timestamp").max().alias("last"),
    ]


def _summary(row: dict[str, Any] | None) -> dict[str, Any]:
    """One stats.json block from an aggregated row (None: an empty split)."""
    if not row or not row["events"]:
        return {"events": 0, "sessions": 0, "items": 0, "buying_sessions": 0, "buy_share": 0.0,
                "first_event": None, "last_event": None}
    sessions, buying = int(row["sessions"]), int(row["buying_sessions"])
    return {
        "events": int(row["events"]), "sessions": sessions, "items": int(row["items"]),
        "buying_sessions": buying, "buy_share": round(buying / sessions, 6),
        "first_event": iso(row["first"]), "last_event": iso(row["last"]),
    }


def describe(frame: pl.DataFrame) -> dict[str, Any]:
    """The statistics block of stats.json for a frame of canonical events."""
    return _summary(frame.select(_summary_columns()).row(0, named=True))


def compute_stats(dataset: str, events: pl.DataFrame, split: SplitResult, notes: dict,
                  settings: dict[str, Any]) -> dict[str, Any]:
    """stats.json: overall and per-split statistics, split method, unseen test items, notes."""
    # Aggregate per split in one pass: filtering out a copy of train would cost a
    # second copy of the whole log at the memory peak.
    per_split = {row["split"]: row for row in events.group_by("split").agg(_summary_columns()).iter_rows(named=True)}
    lazy = events.lazy()
    train_items = lazy.filter(pl.col("split") == "train").select(pl.col("item_id").unique()).collect()["item_id"]
    test_unseen = lazy.filter(pl.col("split") == "test").select(
        "item_id", (~pl.col("item_id").is_in(train_items.implode())).alias("unseen")).collect()
    stats: dict[str, Any] = {"dataset": dataset, **describe(events)}
    stats["splits"] = {name: _summary(per_split.get(name)) for name in SPLITS}
    stats["split_method"] = split.method
    stats["test_items_unseen_in_train"] = int(test_unseen.filter("unseen")["item_id"].n_unique())
    stats["test_events_unseen_item_share"] = (
        round(float(test_unseen["unseen"].mean()), 6) if test_unseen.height else 0.0)
    stats.update(settings)
    stats.update(notes)
    stats.setdefault("dropped_events", {})
    stats.setdefault("warnings", [])
    return stats


def format_table(stats: dict[str, Any]) -> str:
    """Rows all/train/valid/test, columns TABLE_COLUMNS, aligned for a terminal."""
    rows = [("all", stats)] + [(name, stats["splits"][name]) for name in SPLITS]

    def cell(key: str, value: Any) -> str:
        if key == "buy_share":
            return f"{value:.4f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value or "-")

    body = [["split", *TABLE_COLUMNS]] + [[name, *(cell(k, part[k]) for k in TABLE_COLUMNS)] for name, part in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(body[0]))]
    return "\n".join(
        "  ".join(text.ljust(width) if i in (0, 6, 7) else text.rjust(width)
                  for i, (text, width) in enumerate(zip(line, widths))).rstrip()
        for line in body)


def write_outputs(out: Path, events: pl.DataFrame, stats: dict[str, Any]) -> None:
    """events.parquet and stats.json, each written to a temporary name then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    parquet_tmp = out / ".events.parquet.tmp"
    events.write_parquet(parquet_tmp, compression="zstd", statistics=True)
    os.replace(parquet_tmp, out / "events.parquet")
    stats_tmp = out / ".stats.json.tmp"
    stats_tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(stats_tmp, out / "stats.json")


def prepare(dataset: str, input_path: str | Path, out: str | Path, test_days: float | None = None,
            valid_days: float | None = None, session_gap_minutes: float = 30.0,
            buys: str | Path | None = None, complete_buys_below: int | None = None,
            split_method: str = "auto", split_seed: int = 0, random_split_share: float = 0.2) -> dict[str, Any]:
    """Read, clean, split, order and write one dataset; returns the stats (also in stats.json).

    `split_method` "auto": the published split, else temporal; "random": seeded random by
    session (training/split.py), ignoring any published split.
    """
    if split_method not in ("auto", "random"):
        raise ClickscoreError(f"--split must be auto or random, got {split_method!r}")
    test_days = test_days if test_days is not None else DEFAULT_TEST_DAYS.get(dataset, FALLBACK_TEST_DAYS)
    valid_days = valid_days if valid_days is not None else test_days
    notes: dict[str, Any] = {}
    from tqdm import tqdm   # stages with the row count on a terminal; nothing when stderr is not one
    bar = tqdm(total=4, desc=f"prepare {dataset}: reading", unit="stage", disable=None, leave=False,
               file=sys.stderr, bar_format="{desc} [{n}/{total} stages, {elapsed}]")
    try:
        events, published = readers.read(dataset, input_path, session_gap_minutes, notes,
                                          buys=buys, complete_buys_below=complete_buys_below)
    except pl.exceptions.PolarsError as exc:
        # A parser error here nearly always means the file is not the layout of --dataset.
        raise ClickscoreError(f"cannot read {input_path} as --dataset {dataset}: "
                              f"{str(exc).strip().splitlines()[0]}; check --dataset and --input") from None
    bar.set_description_str(f"prepare {dataset}: {events.height:,} rows read, cleaning", refresh=False)
    bar.update()
    events = drop_invalid(events, notes)
    if events.height == 0:
        raise ClickscoreError(f"no valid events left in {input_path} (dropped: {notes.get('dropped_events')})")
    bar.set_description_str(f"prepare {dataset}: {events.height:,} rows, splitting", refresh=False)
    bar.update()
    sessions, row_order = session_table(events)
    if split_method == "random":
        published = None
        split = random_split(sessions, random_split_share, split_seed)
    else:
        split = choose_split(sessions, published, test_days, valid_days)
    if split.warning:
        notes.setdefault("warnings", []).append(split.warning)
    events = ordered(events, row_order, split)
    del sessions, row_order
    settings: dict[str, Any] = {"input": str(input_path)}
    if split_method == "random":
        settings.update(split_seed=split_seed, random_split_share=random_split_share)
    elif published is None:
        settings.update(test_days=test_days, valid_days=valid_days)
    else:
        if dataset == "canonical":
            # A canonical file's own split (a simulated log's temporal one), not a dataset's publication.
            split = SplitResult(split.splits, "from_input", split.warning)
        if not (published["split"] == "valid").any():
            settings["valid_days"] = valid_days     # validation carved from its train part
    if dataset in SESSIONISED:
        settings["session_gap_minutes"] = session_gap_minutes
    if buys:
        settings["buys"] = str(buys)         # the model card's rebuild line repeats it
    bar.set_description_str(f"prepare {dataset}: {events.height:,} rows, writing", refresh=False)
    bar.update()
    stats = compute_stats(dataset, events, split, notes, settings)
    write_outputs(Path(out), events, stats)
    bar.update()
    bar.close()
    for warning in stats["warnings"]:
        print(f"clickscore prepare: warning: {warning}", file=sys.stderr)
    return stats


def run(args: argparse.Namespace) -> int:
    """CLI entry (stream/cli.py): prepare, then print the stats table."""
    stats = prepare(args.dataset, args.input, args.out, test_days=args.test_days,
                    valid_days=args.valid_days, session_gap_minutes=args.session_gap_minutes,
                    buys=args.buys or None, complete_buys_below=args.complete_buys_below,
                    split_method=args.split, split_seed=args.split_seed,
                    random_split_share=args.random_split_share)
    print(f"{stats['dataset']}: split {stats['split_method']}, written to {Path(args.out) / 'events.parquet'}")
    print(format_table(stats))
    unseen = stats["test_items_unseen_in_train"]
    print(f"test items unseen in train: {unseen:,} "
          f"({stats['test_events_unseen_item_share']:.2%} of test events; evaluation counts them as misses)")
    if stats["dropped_events"]:
        print("dropped events: " + ", ".join(f"{k} {v:,}" for k, v in stats["dropped_events"].items()))
    left_out = stats.get("buys_left_out")
    if left_out:
        print(f"buys left out (session not in the clicks): {left_out['events']:,} buy events "
              f"of {left_out['sessions']:,} sessions")
    if stats.get("buys_not_below_complete_buys"):
        print(f"buys left out (session id not below --complete-buys-below): "
              f"{stats['buys_not_below_complete_buys']:,}")
    if stats.get("dropped_purchases_without_views"):
        print(f"dropped purchases without views: {stats['dropped_purchases_without_views']:,}")
    malformed = stats.get("malformed_rows")
    if malformed:
        reasons = ", ".join(f"{k} {v:,}" for k, v in malformed["by_reason"].items())
        print(f"clickscore prepare: warning: {malformed['count']:,} malformed rows left out ({reasons}):",
              file=sys.stderr)
        for row in malformed["first"]:
            where = row["line"] if "line" in row else f"row {row['row']}"
            print(f"  {row['file']}:{where}: {row['reason']}: {row['text']}", file=sys.stderr)
        if malformed["count"] > len(malformed["first"]):
            print(f"  ... and {malformed['count'] - len(malformed['first']):,} more (stats.json)", file=sys.stderr)
    return 0
