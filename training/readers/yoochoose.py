"""YOOCHOOSE (RecSys Challenge 2015) -> canonical events, raw or session-rec prepared.

    frame, split = read("data/yoochoose/", notes={})
    frame, split = read("yoochoose-100k/", buys="yoochoose-raw/yoochoose-buys.dat", complete_buys_below=22000)

Raw layout as distributed (no header, comma-separated):
- `yoochoose-clicks.dat`: SessionId,Timestamp (2014-04-07T10:51:09.277Z),ItemId,Category
  -> `view` events. Category is "0" (unknown -> null), 1-12, "S" (special offer) or
  a brand id; kept as a string.
- `yoochoose-buys.dat` (optional): SessionId,Timestamp,ItemId,Price,Quantity
  -> `transaction` events at their own times; price 0 means unknown -> null. Quantity
  is not in the contract.

Buys (the file beside the clicks, or `buys=` / `--buys FILE`, for either layout) are
joined onto the sessions of the clicks: a buy whose session has no click is left out
and counted (notes["buys_left_out"]), never turned into a buy-only session.
`complete_buys_below=N` keeps only sessions with id < N: a head of the buys file holds
every buy of the low session ids only (docs/data.md), so above N a session without
buys is not known to be a non-buyer.

session-rec prepared layout (tab-separated `SessionId ItemId Time`, unix seconds):
`<prefix>_train_full.txt` + `<prefix>_test.txt`, optionally `<prefix>_train_tr.txt`
+ `<prefix>_train_valid.txt`. These carry a published split, returned as
(session_id, split) rows. session-rec's preparation shifted the raw UTC times by -2 h
(session 3's first click: raw 13:17:46.940Z, prepared 11:17:46.940); we add the 2 h
back so that prepared clicks, raw clicks and buys share one UTC clock
(tests/test_prepare.py checks it on the sessions present in both). Events are those of `_train_full` and `_test`: session-rec's
`_train_valid` also drops clicks on items unseen in `_train_tr` (and the sessions
that leaves too short); we keep them, as evaluation counts unseen items as misses.
So train = the `_train_tr` sessions, valid = the other `_train_full` sessions,
test = the `_test` sessions. Without `_train_tr`/`_train_valid` only train/test are
returned and training/split.py carves validation. No category, no price.

The full clicks file (33M rows, 1.5 GB) is read lazily with explicit dtypes, ids as
Int64 until the end; see docs/data.md for its measured peak memory.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from training.readers.common import (
    canonical, count_dropped, first_line, folder_of, guess_dataset, looks_like, require_rows, scan_rows)

DATASET = "yoochoose"
CLICK_COLUMNS = ("session", "time", "item", "category")
BUY_COLUMNS = ("session", "time", "item", "price", "quantity")
PREPARED_SUFFIXES = ("_train_full.txt", "_test.txt", "_train_tr.txt", "_train_valid.txt")
ISO_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"
# session-rec's prepared Time = raw UTC - 2 h (its pandas parse kept the local clock).
PREPARED_UTC_OFFSET_MS = 2 * 3_600_000


def _check_raw(path: Path, columns: tuple[str, ...]) -> None:
    def fits(line: str) -> bool:
        fields = line.split(",")
        return len(fields) == len(columns) and "T" in fields[1]

    # Most of the first lines, not just the first: one bad first row is a malformed row.
    if not looks_like(path, fits):
        raise ClickscoreError(
            f"{path} does not look like a raw YOOCHOOSE file: expected {len(columns)} comma-separated "
            f"fields without header ({','.join(columns)}, time like 2014-04-07T10:51:09.277Z), "
            f"first line is {first_line(path)[:80]!r}")


def _epoch_ms(column: str) -> pl.Expr:
    return pl.col(column).str.to_datetime(ISO_FORMAT, time_unit="ms", time_zone="UTC",
                                          strict=False).dt.epoch("ms")


TIME_PARSES = {"bad_time": _epoch_ms("time").is_not_null()}
# Price 0 is the file's "unknown"; a negative or non-finite price is a broken row.
PRICE_OK = pl.col("price").is_null() | (pl.col("price").is_finite() & (pl.col("price") >= 0))


def read_raw(clicks_path: Path, buys_path: Path | None, notes: dict | None = None,
             complete_buys_below: int | None = None) -> pl.DataFrame:
    """yoochoose-clicks.dat (+ yoochoose-buys.dat) -> canonical events, clicks first."""
    _check_raw(clicks_path, CLICK_COLUMNS)
    clicks = (
        scan_rows(clicks_path, {"session": pl.Int64(), "time": pl.String(), "item": pl.Int64(),
                                "category": pl.String()}, header=False, names=CLICK_COLUMNS,
                  required=("session", "time", "item"), checks=TIME_PARSES, notes=notes)
        .select(
            pl.col("session"), pl.lit("view").alias("event_type"), pl.col("item"),
            # "0" is the "no category" marker of the challenge, not a category.
            pl.when(pl.col("category") == "0").then(None).otherwise(pl.col("category")).alias("category_id"),
            pl.lit(None, dtype=pl.Float64).alias("price"),
            _epoch_ms("time").alias("timestamp"),
        )
    )
    clicks = limit_sessions(clicks, complete_buys_below, notes)
    if buys_path is not None:
        clicks = join_buys(clicks, buy_events(buys_path, notes), notes, complete_buys_below)
    frame = canonical(clicks.with_columns(
        pl.col("session").cast(pl.String).alias("session_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
    )).collect(engine="streaming")
    return require_rows(frame, clicks_path, DATASET)


def buy_events(buys_path: Path, notes: dict | None = None) -> pl.LazyFrame:
    """yoochoose-buys.dat -> `transaction` rows (session, event_type, item, category_id, price, timestamp)."""
    _check_raw(buys_path, BUY_COLUMNS)
    return (
        scan_rows(buys_path, {"session": pl.Int64(), "time": pl.String(), "item": pl.Int64(),
                              "price": pl.Float64(), "quantity": pl.Int64()}, header=False,
                  names=BUY_COLUMNS, required=("session", "time", "item"),
                  checks={**TIME_PARSES, "bad_price": PRICE_OK}, notes=notes)
        .select(
            pl.col("session"), pl.lit("transaction").alias("event_type"), pl.col("item"),
            pl.lit(None, dtype=pl.String).alias("category_id"),
            # Price 0 marks an unknown price in the buys file.
            pl.when(pl.col("price") > 0).then(pl.col("price")).otherwise(None).alias("price"),
            _epoch_ms("time").alias("timestamp"),
        ))


def join_buys(clicks: pl.LazyFrame, buys: pl.LazyFrame, notes: dict | None = None,
              complete_buys_below: int | None = None) -> pl.LazyFrame:
    """Clicks + the buys of sessions that have clicks; the other buys are counted, not kept.

    Both frames carry an Int64 `session`; clicks come first, so a buy and a click at the
    same millisecond keep the file order (click, then buy). Buys of sessions at or above
    `complete_buys_below` are counted apart (their sessions were left out on purpose).
    """
    if complete_buys_below is not None:
        above = buys.filter(pl.col("session") >= complete_buys_below).select(pl.len()).collect().item()
        if notes is not None:
            notes["buys_not_below_complete_buys"] = int(above)
        buys = buys.filter(pl.col("session") < complete_buys_below)
    sessions = clicks.select(pl.col("session").unique())
    kept = buys.join(sessions, on="session", how="semi")
    left_out = buys.join(sessions, on="session", how="anti").select(
        pl.len().alias("events"), pl.col("session").n_unique().alias("sessions")).collect().row(0)
    if notes is not None:
        notes["buys_left_out"] = {"events": int(left_out[0]), "sessions": int(left_out[1]),
                                  "reason": "session not in the clicks"}
    return pl.concat([clicks, kept], how="diagonal_relaxed")


def limit_sessions(clicks: pl.LazyFrame, below: int | None, notes: dict | None = None) -> pl.LazyFrame:
    """Only the clicks of sessions with id < `below` (None: all), the range where the
    buys are complete; the others are counted in notes."""
    if below is None:
        return clicks
    events, sessions = clicks.filter(pl.col("session") >= below).select(
        pl.len(), pl.col("session").n_unique()).collect().row(0)
    count_dropped(notes, "session_not_below_complete_buys", events)
    if notes is not None:
        notes["complete_buys_below"] = below
        notes["sessions_not_below_complete_buys"] = int(sessions)
    return clicks.filter(pl.col("session") < below)


def _prepared_prefix(folder: Path, given: Path | None) -> str:
    """The `<prefix>` of the session-rec files in `folder` (the given file's, if any)."""
    if given is not None:
        for suffix in PREPARED_SUFFIXES:
            if given.name.endswith(suffix):
                return given.name[: -len(suffix)]
        raise ClickscoreError(
            f"{given} is neither yoochoose-clicks.dat nor a session-rec file (*{'/*'.join(PREPARED_SUFFIXES)}); "
            "point --input at one of those or at their folder")
    prefixes = sorted(p.name[: -len("_train_full.txt")] for p in folder.glob("*_train_full.txt"))
    if len(prefixes) > 1:
        raise ClickscoreError(f"{folder} holds several session-rec datasets {prefixes}; "
                              "point --input at one of their _train_full.txt files")
    if not prefixes:
        hint = guess_dataset(folder)
        raise ClickscoreError(
            f"--dataset yoochoose: {folder} has neither yoochoose-clicks.dat nor *_train_full.txt + *_test.txt"
            + (f"; this looks like --dataset {hint}" if hint and hint != DATASET else ""))
    return prefixes[0]


def _scan_prepared(path: Path, notes: dict | None) -> pl.LazyFrame:
    header = first_line(path).split("\t")
    if header[:3] != ["SessionId", "ItemId", "Time"]:
        raise ClickscoreError(f"{path} has header {header} but a session-rec file needs "
                              "tab-separated SessionId, ItemId, Time")
    columns = {"SessionId": pl.Int64(), "ItemId": pl.Int64(), "Time": pl.Float64()}
    return scan_rows(path, columns, separator="\t", required=columns, notes=notes,
                     checks={"bad_Time": pl.col("Time").is_finite()}).select(*columns)


def read_prepared(folder: Path, prefix: str, notes: dict | None = None, buys_path: Path | None = None,
                  complete_buys_below: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """session-rec files (+ buys) -> (canonical events, published (session_id, split))."""
    paths = {suffix: folder / f"{prefix}{suffix}" for suffix in PREPARED_SUFFIXES}
    for suffix in ("_train_full.txt", "_test.txt"):
        if not paths[suffix].is_file():
            raise ClickscoreError(f"{paths[suffix]} is missing: session-rec data needs both "
                                  f"{prefix}_train_full.txt and {prefix}_test.txt")
    full = _scan_prepared(paths["_train_full.txt"], notes)
    test = _scan_prepared(paths["_test.txt"], notes)
    clicks = pl.concat([full, test]).select(
        pl.col("SessionId").alias("session"), pl.lit("view").alias("event_type"), pl.col("ItemId").alias("item"),
        # Seconds with ms decimals; round, not truncate, to undo float error; +2 h back to UTC.
        ((pl.col("Time") * 1000).round(0).cast(pl.Int64) + PREPARED_UTC_OFFSET_MS).alias("timestamp"))
    clicks = limit_sessions(clicks, complete_buys_below, notes)
    if buys_path is not None:
        clicks = join_buys(clicks, buy_events(buys_path, notes), notes, complete_buys_below)
    if complete_buys_below is not None:
        full, test = (frame.filter(pl.col("SessionId") < complete_buys_below) for frame in (full, test))
    events = canonical(clicks.with_columns(
        pl.col("session").cast(pl.String).alias("session_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
    )).collect()
    test_sessions = test.select(pl.col("SessionId").unique()).collect()["SessionId"]
    full_sessions = full.select(pl.col("SessionId").unique()).collect()["SessionId"]
    overlap = full_sessions.is_in(test_sessions.implode()).sum()
    if overlap:
        raise ClickscoreError(f"{overlap} sessions are in both {prefix}_train_full.txt and {prefix}_test.txt; "
                              "these files do not form a split")
    has_tuning = paths["_train_tr.txt"].is_file() and paths["_train_valid.txt"].is_file()
    if has_tuning:
        train_sessions = _scan_prepared(paths["_train_tr.txt"], notes).select(pl.col("SessionId").unique()).collect()
        full_split = pl.DataFrame({"SessionId": full_sessions}).with_columns(
            pl.when(pl.col("SessionId").is_in(train_sessions["SessionId"].implode()))
            .then(pl.lit("train")).otherwise(pl.lit("valid")).alias("split"))
    else:
        full_split = pl.DataFrame({"SessionId": full_sessions, "split": "train"})
    published = pl.concat([
        full_split,
        pl.DataFrame({"SessionId": test_sessions, "split": "test"}),
    ]).select(pl.col("SessionId").cast(pl.String).alias("session_id"), "split")
    return require_rows(events, paths["_train_full.txt"], DATASET), published


def read(input_path: str | Path, notes: dict | None = None, buys: str | Path | None = None,
         complete_buys_below: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Raw clicks (+buys) or session-rec prepared files (+buys) -> (events, published split or None).

    `buys`: the buys file to join (default: yoochoose-buys.dat beside the clicks, if any).
    """
    folder, given = folder_of(input_path)
    if buys is not None:
        buys_path: Path | None = Path(buys)
        if not buys_path.is_file():
            raise ClickscoreError(f"--buys {buys}: no such file; give the path of yoochoose-buys.dat")
    else:
        buys_path = folder / "yoochoose-buys.dat" if (folder / "yoochoose-buys.dat").is_file() else None
    if complete_buys_below is not None and buys_path is None:
        raise ClickscoreError("--complete-buys-below needs a buys file: put yoochoose-buys.dat beside the "
                              "clicks or give --buys FILE")
    raw_clicks = given if given is not None and given.suffix == ".dat" else (
        folder / "yoochoose-clicks.dat" if given is None and (folder / "yoochoose-clicks.dat").is_file() else None)
    if raw_clicks is not None:
        if "buys" in raw_clicks.name:
            raise ClickscoreError(f"{raw_clicks} is the buys file; point --input at yoochoose-clicks.dat "
                                  "or its folder (the buys file beside it is read too)")
        if buys_path is None and notes is not None:
            notes.setdefault("warnings", []).append(
                f"no yoochoose-buys.dat beside {raw_clicks.name}: no transaction events, no buy labels")
        if notes is not None:
            notes["files"] = [raw_clicks.name] + ([buys_path.name] if buys_path else [])
        return read_raw(raw_clicks, buys_path, notes, complete_buys_below), None
    prefix = _prepared_prefix(folder, given)
    if notes is not None:
        notes["files"] = sorted(p.name for p in folder.glob(f"{prefix}_*.txt")) + (
            [str(buys_path)] if buys_path else [])
    return read_prepared(folder, prefix, notes, buys_path, complete_buys_below)
