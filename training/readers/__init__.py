"""Readers: one module per public dataset layout, each -> the canonical event frame.

    from training.readers import read
    events, published_split = read("yoochoose", "data/yoochoose-100k/", 30.0, notes={})

`events` is a polars DataFrame with the columns and dtypes of `CANONICAL_SCHEMA`
(docs/CONTRACTS.md, without `split`) in the input's original order;
`published_split` is a (session_id, split) DataFrame when the input carries its own
split (session-rec YOOCHOOSE files, a canonical file with `split`), else None.
`notes`, when given, collects what a reader dropped or assumed (dropped_events by
reason, dropped_purchases_without_views, category_source, warnings, ...), which
`clickscore prepare` writes into stats.json.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from stream.errors import ClickscoreError
from training.readers.common import CANONICAL_SCHEMA

__all__ = ["CANONICAL_SCHEMA", "DATASETS", "read"]

DATASETS = ("retailrocket", "yoochoose", "diginetica", "taobao", "rees46", "otto", "canonical")


def read(dataset: str, input_path: str | Path, session_gap_minutes: float = 30.0,
         notes: dict | None = None, buys: str | Path | None = None,
         complete_buys_below: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Dispatch to the reader of `dataset`; modules are imported only when used.

    `buys` / `complete_buys_below` are YOOCHOOSE's (training/readers/yoochoose.py).
    """
    if dataset != "yoochoose" and (buys is not None or complete_buys_below is not None):
        raise ClickscoreError("--buys and --complete-buys-below are for --dataset yoochoose only")
    if dataset == "retailrocket":
        from training.readers import retailrocket
        return retailrocket.read(input_path, session_gap_minutes, notes), None
    if dataset == "yoochoose":
        from training.readers import yoochoose
        return yoochoose.read(input_path, notes, buys=buys, complete_buys_below=complete_buys_below)
    if dataset == "diginetica":
        from training.readers import diginetica
        return diginetica.read(input_path, notes), None
    if dataset == "taobao":
        from training.readers import taobao
        return taobao.read(input_path, session_gap_minutes, notes), None
    if dataset == "rees46":
        from training.readers import rees46
        return rees46.read(input_path, notes), None
    if dataset == "otto":
        from training.readers import otto
        return otto.read(input_path, notes), None
    if dataset == "canonical":
        from training.readers import canonical
        return canonical.read(input_path, notes)
    raise ClickscoreError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
