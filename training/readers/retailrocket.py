"""Retail Rocket (Kaggle "retailrocket/ecommerce-dataset") -> canonical events.

    frame = read("data/retailrocket/", session_gap_minutes=30.0, notes={})

Layout as distributed (`--input` is the folder, or `events.csv` inside it):
- `events.csv`: timestamp (epoch ms),visitorid,event (view|addtocart|transaction),
  itemid,transactionid
- `item_properties_part1.csv`, `item_properties_part2.csv`: timestamp,itemid,
  property,value; the property `categoryid` is the item's category, which changes
  over time: we take each item's latest value.
- `category_tree.csv`: categoryid,parentid (only checked: the contract has one
  category level).
A third-party `item_category.csv` (ItemId,categoryid,parentid) is used for the
category when the properties files are absent.

No session ids: sessions are cut per visitor at `session_gap_minutes` of inactivity.
No price: the `790` property looks like a price but is hashed, so price stays null.
`transactionid` names an order shared by several rows, not an event, so event_id
stays null.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from training.readers.common import canonical, check_header, find_file, folder_of, require_rows, scan_rows
from training.sessionize import sessionize

DATASET = "retailrocket"
EVENT_COLUMNS = ("timestamp", "visitorid", "event", "itemid", "transactionid")
PROPERTY_COLUMNS = ("timestamp", "itemid", "property", "value")
EVENT_TYPES = {"view": "view", "addtocart": "addtocart", "transaction": "transaction"}


def item_categories(folder: Path, notes: dict | None) -> pl.LazyFrame | None:
    """(item_id, category_id) from the properties files, else item_category.csv, else None."""
    parts = [folder / name for name in ("item_properties_part1.csv", "item_properties_part2.csv")]
    present = [p for p in parts if p.is_file()]
    if present:
        if len(present) == 1 and notes is not None:
            notes.setdefault("warnings", []).append(
                f"only {present[0].name} found: items listed only in the other part have no category")
        for path in present:
            check_header(path, PROPERTY_COLUMNS, dataset=DATASET)
        # Filter before anything else: `categoryid` is a few % of the ~20M property rows.
        properties = pl.concat([
            scan_rows(path, {"timestamp": pl.Int64(), "itemid": pl.Int64(), "property": pl.String(),
                             "value": pl.String()}, required=PROPERTY_COLUMNS, notes=notes)
            .select(PROPERTY_COLUMNS)
            for path in present
        ]).filter(pl.col("property") == "categoryid")
        if notes is not None:
            notes["category_source"] = "+".join(p.name for p in present)
        return (properties
                .sort("timestamp", maintain_order=True)
                .group_by("itemid")
                .agg(pl.col("value").last().alias("category_id"))
                .select(pl.col("itemid").alias("item_key"), "category_id"))
    third_party = folder / "item_category.csv"
    if third_party.is_file():
        check_header(third_party, ("ItemId", "categoryid"), dataset=DATASET)
        if notes is not None:
            notes["category_source"] = third_party.name
        return (scan_rows(third_party, {"ItemId": pl.Int64(), "categoryid": pl.String()},
                          required=("ItemId", "categoryid"), notes=notes)
                .select(pl.col("ItemId").alias("item_key"), pl.col("categoryid").alias("category_id"))
                .unique("item_key", keep="last", maintain_order=True))
    if notes is not None:
        notes["category_source"] = None
        notes.setdefault("warnings", []).append(
            "no item_properties_part*.csv or item_category.csv: category_id is null")
    return None


def check_category_tree(folder: Path, categories: pl.LazyFrame | None, notes: dict | None) -> None:
    """Validate category_tree.csv if present and count event categories it lacks."""
    tree = folder / "category_tree.csv"
    if not tree.is_file() or categories is None:
        return
    check_header(tree, ("categoryid", "parentid"), dataset=DATASET)
    known = scan_rows(tree, {"categoryid": pl.String(), "parentid": pl.String()}, required=("categoryid",),
                      notes=notes).select("categoryid").collect()["categoryid"]
    missing = categories.filter(~pl.col("category_id").is_in(known.implode())).select(pl.len()).collect().item()
    if notes is not None:
        notes["items_with_category_missing_from_tree"] = int(missing)


def read(input_path: str | Path, session_gap_minutes: float, notes: dict | None = None) -> pl.DataFrame:
    """Read a Retail Rocket folder into canonical events (original row order within a session)."""
    folder, given = folder_of(input_path)
    events_path = given if given is not None and given.name == "events.csv" else find_file(
        folder, ["events.csv"], DATASET)
    check_header(events_path, EVENT_COLUMNS, dataset=DATASET)
    events = (
        scan_rows(events_path, {"timestamp": pl.Int64(), "visitorid": pl.Int64(), "event": pl.String(),
                                "itemid": pl.Int64(), "transactionid": pl.Int64()},
                  required=("timestamp", "visitorid", "event", "itemid"), notes=notes,
                  checks={"unknown_event": pl.col("event").is_in(list(EVENT_TYPES))})
        .select("_line", *EVENT_COLUMNS)
        .rename({"_line": "_row"})
    )
    categories = item_categories(folder, notes)
    check_category_tree(folder, categories, notes)
    if categories is not None:
        events = events.join(categories, left_on="itemid", right_on="item_key", how="left",
                             maintain_order="left")
    sessions = sessionize(events, "visitorid", session_gap_minutes, order_column="_row")
    frame = canonical(sessions.sort("_row").with_columns(
        pl.col("event").alias("event_type"),
        pl.col("itemid").cast(pl.String).alias("item_id"),
        pl.col("visitorid").cast(pl.String).alias("user_id"),
    )).collect()
    return require_rows(frame, events_path, DATASET)
