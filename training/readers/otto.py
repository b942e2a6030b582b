"""OTTO session dataset (otto-de/recsys-dataset) -> canonical events.

    frame = read("data/otto/train.jsonl", notes={})

Layout as distributed: JSON lines, one session a line:
`{"session": 0, "events": [{"aid": 1517085, "ts": 1659304800025, "type": "clicks"}, ...]}`
with type clicks -> view, carts -> addtocart, orders -> transaction. `ts` is epoch ms
in the official release; some re-releases (the Kaggle "otto-full-optimized" files)
store seconds, so a log whose largest ts is below 10^11 (year 1973 in ms, year 5138
in seconds) is read as seconds. `--input` is the file, or a folder with one *.jsonl.
No category, no price, no user.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from training.readers.common import canonical, first_line, folder_of, report_malformed, require_rows

DATASET = "otto"
EVENT_TYPES = {"clicks": "view", "carts": "addtocart", "orders": "transaction"}
SECONDS_BELOW = 10**11
SCHEMA = {"session": pl.Int64, "events": pl.List(pl.Struct({"aid": pl.Int64, "ts": pl.Int64, "type": pl.String}))}


def _input_file(input_path: str | Path) -> Path:
    folder, given = folder_of(input_path)
    if given is not None:
        return given
    candidates = sorted(folder.glob("*.jsonl"))
    if len(candidates) != 1:
        raise ClickscoreError(f"--dataset otto: expected one *.jsonl in {folder}, found "
                              f"{[p.name for p in candidates]}; point --input at the file")
    return candidates[0]


def _read_checked_lines(path: Path, notes: dict | None) -> pl.DataFrame:
    """Slow path, only for a file polars cannot parse whole: keep the lines that are
    OTTO sessions, report the others with their line numbers. Bad lines become
    empty sessions so row numbers still equal line numbers."""
    good: list[bytes] = []
    bad_lines: list[tuple[int, str]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and isinstance(record.get("session"), int) \
                    and isinstance(record.get("events"), list) \
                    and all(isinstance(e, dict) and isinstance(e.get("aid"), int) for e in record["events"])
            except ValueError:
                ok = False
            if ok:
                good.append(line.rstrip(b"\r\n"))
            else:
                bad_lines.append((number, "invalid_json_line"))
                good.append(b'{"session": -1, "events": []}')
    report_malformed(notes, path, pl.DataFrame(bad_lines, schema={"_line": pl.UInt32, "_reason": pl.String},
                                               orient="row"))
    return pl.read_ndjson(io.BytesIO(b"\n".join(good)), schema=SCHEMA)


def read(input_path: str | Path, notes: dict | None = None) -> pl.DataFrame:
    """OTTO JSON lines -> canonical events (sessions and events in file order)."""
    path = _input_file(input_path)
    head = first_line(path)
    if not (head.startswith("{") and '"session"' in head and '"events"' in head):
        raise ClickscoreError(f"{path} does not look like OTTO JSON lines "
                              '({"session": ..., "events": [{"aid", "ts", "type"}]}); '
                              f"first line is {head[:80]!r}")
    try:
        sessions = pl.read_ndjson(path, schema=SCHEMA)
    except pl.exceptions.PolarsError:
        sessions = _read_checked_lines(path, notes)
    rows = (sessions.with_row_index("_line", offset=1)
            .explode("events").unnest("events")
            .filter(pl.col("aid").is_not_null()))
    unknown = rows.filter(~pl.col("type").is_in(list(EVENT_TYPES)) | pl.col("ts").is_null())
    if unknown.height:
        report_malformed(notes, path, unknown.select("_line", pl.lit("unknown_event_type_or_ts").alias("_reason"))
                         .unique("_line", maintain_order=True))
        rows = rows.filter(pl.col("type").is_in(list(EVENT_TYPES)) & pl.col("ts").is_not_null())
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
