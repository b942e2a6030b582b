"""Helpers every reader shares: finding files, checking headers, the canonical frame.

A reader turns one public layout into a polars DataFrame with exactly the columns of
`CANONICAL_SCHEMA`, in the input's original row order (ordering and splitting are the
caller's job: training/prepare.py). Anything wrong with the input raises
ClickscoreError with a sentence that says what to fix.
"""
from __future__ import annotations

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
