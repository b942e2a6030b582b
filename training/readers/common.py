"""Helpers every reader shares: finding files, checking headers, the canonical frame.

A reader turns one public layout into a polars DataFrame with exactly the columns of
`CANONICAL_SCHEMA`, in the input's original row order (ordering and splitting are the
caller's job: training/prepare.py). Anything wrong with the input raises
ClickscoreError with a sentence that says what to fix.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

import polars as pl

from stream.errors import ClickscoreError

# The columns of DIR/events.parquet before `split` is added (docs/CONTRACTS.md).
CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "session_id": pl.String(),
    "event_type": pl.String(),
    "item_id": pl.String(),
    "category_id": pl.String(),
    "price": pl.Float64(),
    "timestamp": pl.Int64(),
    "user_id": pl.String(),
    "event_id": pl.String(),
}

MS_PER_MINUTE = 60_000
MS_PER_DAY = 86_400_000


def canonical(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Select the canonical columns in contract order and dtypes; absent ones become null."""
    lazy = frame.lazy()
    present = set(lazy.collect_schema().names())
    return lazy.select([
        (pl.col(name) if name in present else pl.lit(None)).cast(dtype).alias(name)
        for name, dtype in CANONICAL_SCHEMA.items()
    ])


def count_dropped(notes: dict | None, reason: str, count: int) -> None:
    """Record `count` events dropped for `reason` under notes["dropped_events"]."""
    if notes is None or count <= 0:
        return
    dropped = notes.setdefault("dropped_events", {})
    dropped[reason] = dropped.get(reason, 0) + int(count)


def first_line(path: Path) -> str:
    """The first line of a text file, without its line ending ('' for an empty file)."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace", newline="") as handle:
            return handle.readline().rstrip("\r\n").lstrip("\ufeff")
    except OSError as exc:
        raise ClickscoreError(f"cannot read {path}: {exc.strerror}") from None


def check_header(path: Path, expected: Iterable[str], separator: str = ",", dataset: str = "") -> None:
    """Fail unless the file's header holds the expected columns (in any order)."""
    found = [name.strip().strip('"') for name in first_line(path).split(separator)]
    missing = [name for name in expected if name not in found]
    if missing:
        what = f"a {dataset} file" if dataset else "this file"
        raise ClickscoreError(
            f"{path} has columns {found[:12]} but {what} needs {list(expected)} "
            f"(missing {missing}, separator {separator!r}); "
            "check --dataset and that the file is the one as distributed")


def folder_of(input_path: str | Path) -> tuple[Path, Path | None]:
    """(folder, file or None): `--input` may name the folder or one file inside it."""
    path = Path(input_path).expanduser()
    if not path.exists():
        raise ClickscoreError(f"--input {path} does not exist")
    if path.is_dir():
        return path, None
    return path.parent, path


def single_file(input_path: str | Path, pattern: str, dataset: str) -> Path:
    """`--input` names the file, or a folder holding exactly one file matching `pattern`."""
    folder, given = folder_of(input_path)
    if given is not None:
        return given
    candidates = sorted(folder.glob(pattern))
    if len(candidates) != 1:
        raise ClickscoreError(f"--dataset {dataset}: expected one {pattern} in {folder}, found "
                              f"{[p.name for p in candidates]}; point --input at the file")
    return candidates[0]


def find_file(folder: Path, names: Iterable[str], dataset: str, required: bool = True) -> Path | None:
    """The first of `names` present in `folder`, else None or a ClickscoreError."""
    names = list(names)
    for name in names:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    if not required:
        return None
    present = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
    hint = guess_dataset(folder)
    raise ClickscoreError(
        f"--dataset {dataset}: found none of {names} in {folder} (it holds {present})"
        + (f"; this looks like --dataset {hint}" if hint and hint != dataset else "")
        + "; point --input at the folder with the files as distributed (see docs/data.md)")


# File names that give a dataset away, to turn "wrong --dataset" into a helpful hint.
_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("events.csv", "retailrocket"),
    ("item_properties_part1.csv", "retailrocket"),
    ("item_category.csv", "retailrocket"),
    ("yoochoose-clicks.dat", "yoochoose"),
    ("_train_full.txt", "yoochoose"),
    ("train-item-views.csv", "diginetica"),
    ("train-purchases.csv", "diginetica"),
    ("UserBehavior", "taobao"),
    ("-Oct", "rees46"),
    ("-Nov", "rees46"),
    (".jsonl", "otto"),
)


def guess_dataset(path: Path) -> str | None:
    """Best guess at the dataset a file or folder holds, from file names only."""
    names = [p.name for p in path.iterdir()] if path.is_dir() else [path.name]
    for fragment, dataset in _SIGNATURES:
        if any(fragment in name for name in names):
            return dataset
    return None


def require_rows(frame: pl.DataFrame, path: Path | str, dataset: str) -> pl.DataFrame:
    """Fail on an input that yields no events at all (an empty or foreign file)."""
    if frame.height == 0:
        raise ClickscoreError(f"--dataset {dataset}: {path} yields no events; is it the right file?")
    return frame


# -- malformed rows ----------------------------------------------------------------------
# A bad row never stops a preparation and is never dropped silently: it is left out,
# counted by reason, and reported with its file and 1-based line number in
# notes["malformed_rows"] (stats.json) and on stderr.

MALFORMED_SHOWN = 20
# What a byte that is not UTF-8 reads as (files are decoded leniently, then such rows reported).
REPLACEMENT = "\ufffd"
LAYOUT_SAMPLE_LINES = 20


def head_lines(path: Path, count: int = LAYOUT_SAMPLE_LINES) -> list[str]:
    """The first `count` non-blank lines of a text file (a layout check looks at several,
    so that one malformed first row is reported as such instead of failing the file)."""
    lines: list[str] = []
    try:
        with open(path, "r", encoding="utf-8", errors="replace", newline="") as handle:
            for text in handle:
                text = text.rstrip("\r\n").lstrip("\ufeff")
                if text.strip():
                    lines.append(text)
                if len(lines) >= count:
                    break
    except OSError as exc:
        raise ClickscoreError(f"cannot read {path}: {exc.strerror}") from None
    return lines


def looks_like(path: Path, matches) -> bool:
    """True when most of the file's first non-blank lines satisfy `matches(line)`."""
    lines = head_lines(path)
    return bool(lines) and sum(1 for line in lines if matches(line)) * 2 > len(lines)


def raw_rows(path: Path, names: Iterable[str], *, separator: str = ",", header: bool = True,
             quote_char: str | None = None, source: bytes | None = None) -> pl.LazyFrame:
    """The fields of a delimited text file as strings, with `_line` (1-based line number)
    and `_reason`, the structural problem of the row or null: `blank_line`,
    `too_many_fields`. Empty and absent fields are null.

    `quote_char` None (the public layouts, which never quote) makes every line one row,
    so `_line` is exact and a stray quote cannot swallow the lines after it; with
    quoting, a quoted field that spans lines shifts the numbers of the lines after it.
    Bytes that are not UTF-8 make their row `bad_encoding` (not the whole file unreadable).
    `source`, when given, is the file's content to parse instead of reading `path`.
    """
    names = list(names)
    raw = pl.scan_csv(
        io.BytesIO(source) if source is not None else path, has_header=False, skip_rows=1 if header else 0,
        separator=separator, quote_char=quote_char, encoding="utf8-lossy",
        schema={**{n: pl.String for n in names}, "_extra": pl.String}, missing_columns="insert",
        truncate_ragged_lines=True,
    ).with_row_index("_line", offset=2 if header else 1)
    # A short row reads as nulls for its absent fields: it is reported as the first
    # required field it lacks (missing_<column>), like an empty field.
    blank = pl.all_horizontal([pl.col(n).is_null() for n in names]) & pl.col("_extra").is_null()
    reason = (pl.when(blank).then(pl.lit("blank_line"))
              .when(pl.col("_extra").is_not_null()).then(pl.lit("too_many_fields"))
              .when(pl.any_horizontal([pl.col(n).str.contains(REPLACEMENT, literal=True) for n in names]))
              .then(pl.lit("bad_encoding"))
              .otherwise(None))
    return raw.with_columns(reason.alias("_reason")).with_columns(
        [pl.when(pl.col(n).str.strip_chars() == "").then(None).otherwise(pl.col(n)).alias(n) for n in names]
    ).drop("_extra")


def scan_rows(path: Path, schema: dict[str, pl.DataType], *, separator: str = ",", header: bool = True,
              names: Iterable[str] | None = None, required: Iterable[str] = (),
              checks: dict[str, pl.Expr] | None = None, notes: dict | None = None,
              quote_char: str | None = None) -> pl.LazyFrame:
    """Typed rows of a delimited text file with their `_line` number; rows that do not fit
    are reported and left out.

    `names` are the file's columns in order (default: its header). A row is malformed
    when it is blank (`blank_line`), has more fields than `names` (`too_many_fields`),
    a `required` field is empty or absent, as in a short row (`missing_<column>`), a value does not parse as its `schema` type (`bad_<column>`),
    or a `checks` expression (on the typed row) is not true (its key); a row gets its
    first problem in that order. The file is scanned twice (once for the report, once
    for the rows), lazily, so a clean multi-GB file costs parsing time, not memory.
    """
    names = list(names) if names is not None else [
        n.strip().strip('"') for n in first_line(path).split(separator)]
    raw = raw_rows(path, names, separator=separator, header=header, quote_char=quote_char)
    reason = pl.when(pl.col("_reason").is_not_null()).then(pl.col("_reason"))
    for column in required:
        reason = reason.when(pl.col(column).is_null()).then(pl.lit(f"missing_{column}"))
    typed_columns = {c: t for c, t in schema.items() if t != pl.String()}
    for column, dtype in typed_columns.items():
        reason = reason.when(pl.col(column).is_not_null()
                             & pl.col(column).str.strip_chars().cast(dtype, strict=False).is_null()
                             ).then(pl.lit(f"bad_{column}"))
    rows = raw.with_columns(reason.otherwise(None).alias("_reason")).with_columns(
        [pl.col(c).str.strip_chars().cast(t, strict=False) for c, t in typed_columns.items()])
    if checks:
        check = pl.when(pl.col("_reason").is_not_null()).then(pl.col("_reason"))
        for name, ok in checks.items():
            check = check.when(~ok.fill_null(False)).then(pl.lit(name))
        rows = rows.with_columns(check.otherwise(None).alias("_reason"))
    bad = rows.filter(pl.col("_reason").is_not_null()).select("_line", "_reason").collect(engine="streaming")
    report_malformed(notes, path, bad)
    return rows.filter(pl.col("_reason").is_null()).drop("_reason")


JSON_CHUNK_LINES = 65_536


def json_lines(path: Path, dtype: pl.Struct, notes: dict | None) -> pl.DataFrame:
    """A JSON-lines file decoded line by line to `dtype` (fields `dtype.fields`), with
    `_line`; blank lines (`blank_line`), lines that are not JSON (`invalid_json`) and
    JSON lines whose values do not fit `dtype` (`bad_value`) are reported and left out.

    Lines are decoded by polars in chunks; only a chunk that fails is halved, down to
    its bad lines, so a clean file is never looked at line by line in Python.
    """
    try:
        texts = pl.read_csv(path, has_header=False, separator="\x1f", quote_char=None, encoding="utf8-lossy",
                            schema={"_text": pl.String}, truncate_ragged_lines=True)["_text"]
    except OSError as exc:
        raise ClickscoreError(f"cannot read {path}: {exc}") from None
    texts = texts.str.strip_chars()
    blank = texts.is_null() | (texts == "")
    texts = pl.select(pl.when(pl.lit(blank)).then(pl.lit("null")).otherwise(pl.lit(texts)))["literal"]
    decoded: list[pl.Series] = []
    bad: list[tuple[int, str]] = []
    empty = pl.Series("_value", [None], dtype=dtype)

    def decode(start: int, end: int) -> None:
        piece = texts.slice(start, end - start)
        try:
            decoded.append(piece.str.json_decode(dtype).alias("_value"))
            return
        except pl.exceptions.PolarsError:
            pass
        if end - start == 1:
            text = piece[0]
            try:
                json.loads(text)
                bad.append((start + 1, "bad_value"))
            except ValueError:
                bad.append((start + 1, "invalid_json"))
            decoded.append(empty)
            return
        middle = (start + end) // 2
        decode(start, middle)
        decode(middle, end)

    for start in range(0, len(texts), JSON_CHUNK_LINES):
        decode(start, min(start + JSON_CHUNK_LINES, len(texts)))
    values = pl.concat(decoded) if decoded else pl.Series("_value", [], dtype=dtype)
    frame = pl.DataFrame({"_value": values}).with_row_index("_line", offset=1).with_columns(
        pl.when(pl.lit(blank)).then(pl.lit("blank_line"))
        .when(pl.lit(texts.str.contains(REPLACEMENT, literal=True))).then(pl.lit("bad_encoding"))
        .when(pl.col("_value").is_null()).then(pl.lit("not_an_object")).otherwise(None).alias("_reason"))
    if bad:
        marks = pl.DataFrame(bad, schema={"_line": pl.UInt32, "_bad": pl.String}, orient="row")
        frame = frame.join(marks, on="_line", how="left", maintain_order="left").with_columns(
            pl.coalesce("_bad", "_reason").alias("_reason")).drop("_bad")
    report_malformed(notes, path, frame.filter(pl.col("_reason").is_not_null()).select("_line", "_reason"))
    return frame.filter(pl.col("_reason").is_null()).unnest("_value").drop("_reason")


def report_malformed(notes: dict | None, path: Path, bad: pl.DataFrame, text_lines: bool = True) -> None:
    """Add rows (`_line`, `_reason`) of `path` to notes["malformed_rows"]; `_line` is a
    row number instead where the file has no lines (`text_lines=False`, Parquet)."""
    if notes is None or bad.height == 0:
        return
    report = notes.setdefault("malformed_rows", {"count": 0, "by_reason": {}, "first": []})
    report["count"] += bad.height
    for reason, count in bad.group_by("_reason").len().sort("_reason").iter_rows():
        report["by_reason"][reason] = report["by_reason"].get(reason, 0) + int(count)
    room = MALFORMED_SHOWN - len(report["first"])
    if room <= 0:
        return
    first = bad.sort("_line").head(room)
    texts = _line_texts(path, set(first["_line"].to_list())) if text_lines else {}
    where = "line" if text_lines else "row"
    for line, reason in first.iter_rows():
        report["first"].append({"file": path.name, where: int(line), "reason": reason,
                                "text": texts.get(int(line), "")[:200]})
    # Files in the order they were read, lines ascending within each.
    order = {name: i for i, name in reversed(list(enumerate(r["file"] for r in report["first"])))}
    report["first"].sort(key=lambda r: (order[r["file"]], r.get("line", r.get("row", 0))))


def _line_texts(path: Path, lines: set[int]) -> dict[int, str]:
    """The text of the given 1-based lines (reads up to the last one only)."""
    found: dict[int, str] = {}
    if not lines:
        return found
    last = max(lines)
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as handle:
        for number, text in enumerate(handle, start=1):
            if number in lines:
                found[number] = text.rstrip("\r\n")
            if number >= last:
                break
    return found
