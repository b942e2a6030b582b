"""Assign every session to train, valid or test.

    sessions, row_order = session_table(events)            # (session_id, start, end, order), order per event
    splits, method = temporal_split(sessions, test_days=7, valid_days=7)
    splits, method = published_split(sessions, published, valid_days=1)
    splits, method = random_split(sessions, share=0.2, seed=0)

Whole sessions go to one split, by the time they start, so no session is cut in two
and no test session is seen in training (its buy label cannot leak).
- temporal: test = sessions that start in the last `test_days` of the log (its
  last event), valid = those starting in the `valid_days` before. When the log is
  shorter than test + valid + test days (a small sample), or either window is empty,
  or the training part would hold fewer sessions than the test part, it falls back
  to session-start quantiles: the last 10% of sessions are test, the 10% before
  valid (method "temporal_quantile").
- random (`prepare --split random`): each session goes to test with probability
  `share`, to valid with `share`, else train, drawn from a seeded generator in
  session-start order (same log and seed, same split). For short logs where a
  temporal split leaves too few buyers in test (the REES46 head: 4 buying test
  sessions by time, about 40 of 200 at share 0.2); it measures within-period
  generalisation, not the future, which docs/data.md says beside the figures.
- published: the dataset's own split is kept; if it has no validation part, the
  train sessions that start in the last `valid_days` of the train part become valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from stream.errors import ClickscoreError

MS_PER_DAY = 86_400_000
QUANTILE_SHARE = 0.10
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitResult:
    """Per-session split plus how it was made (for stats.json and the warning line)."""
    splits: pl.DataFrame          # (session_id, split)
    method: str                   # published | from_input (prepare, canonical) | temporal | temporal_quantile
    warning: str | None = None


def session_table(events: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """Sessions in order of their first event (ties by input order), and each event's session.

    Returns (session_id, start, end, order) with order = 0, 1, ... and a uint32 array
    giving every event row its session's order. Sessions are keyed by categorical
    codes, not strings: joining 33M string keys would double prepare's peak memory.
    """
    codes = events["session_id"].cast(pl.Categorical).to_physical()
    sessions = (
        pl.DataFrame({"code": codes, "timestamp": events["timestamp"]})
        .with_row_index("_row")
        .group_by("code")
        .agg(pl.col("timestamp").min().alias("start"), pl.col("timestamp").max().alias("end"),
             pl.col("_row").min().alias("_first"))
        .sort("start", "_first")
        .with_row_index("order")
    )
    order_of_code = np.zeros(int(codes.max()) + 1, dtype=np.uint32)
    order_of_code[sessions["code"].to_numpy()] = sessions["order"].to_numpy()
    row_order = order_of_code[codes.to_numpy()]
    sessions = sessions.with_columns(events["session_id"].gather(sessions["_first"]).alias("session_id"))
    return sessions.select("session_id", "start", "end", "order"), row_order


def _by_quantile(sessions: pl.DataFrame, with_valid: bool = True) -> pl.Series:
    """Split labels for `sessions` (in start order): last 10% test, 10% before valid."""
    count = sessions.height
    if count < (3 if with_valid else 2):
        raise ClickscoreError(f"only {count} session(s): too few to split into train/valid/test; "
                              "give a longer log")
    n_test = max(1, round(count * QUANTILE_SHARE))
    n_valid = max(1, round(count * QUANTILE_SHARE)) if with_valid else 0
    position = pl.int_range(0, count, eager=True)
    return (pl.select(
        pl.when(position >= count - n_test).then(pl.lit("test"))
        .when(position >= count - n_test - n_valid).then(pl.lit("valid"))
        .otherwise(pl.lit("train")).alias("split"))
        .to_series())


def temporal_split(sessions: pl.DataFrame, test_days: float, valid_days: float) -> SplitResult:
    """Split by session start against the last days of the log (see module docstring)."""
    if not test_days > 0 or valid_days < 0:
        raise ClickscoreError(f"--test-days must be > 0 and --valid-days >= 0, got {test_days} and {valid_days}")
    log_end = sessions["end"].max()
    test_cut = log_end - int(test_days * MS_PER_DAY)
    valid_cut = test_cut - int(valid_days * MS_PER_DAY)
    log_start = sessions["start"].min()
    labels = sessions.select(
        "session_id",
        pl.when(pl.col("start") >= test_cut).then(pl.lit("test"))
        .when(pl.col("start") >= valid_cut).then(pl.lit("valid"))
        .otherwise(pl.lit("train")).alias("split"))
    counts = dict(labels["split"].value_counts().iter_rows())
    span_days = (log_end - log_start) / MS_PER_DAY
    empty = [name for name in SPLITS if not counts.get(name) and (name != "valid" or valid_days > 0)]
    if span_days < 2 * test_days + valid_days:
        reason = (f"the log spans {span_days:.2f} days, shorter than {test_days:g} train + {valid_days:g} valid + "
                  f"{test_days:g} test days")
    elif empty:
        reason = f"no session starts in the {'/'.join(empty)} window(s)"
    elif counts["train"] < counts["test"]:
        reason = (f"only {counts['train']} sessions start before the last {test_days + valid_days:g} days, "
                  f"fewer than the {counts['test']} test sessions")
    else:
        return SplitResult(labels, "temporal")
    warning = (f"{reason}: split by session start instead (last 10% of sessions test, the 10% before valid); "
               "set --test-days/--valid-days to split by time")
    return SplitResult(sessions.select("session_id", _by_quantile(sessions, valid_days > 0)),
                       "temporal_quantile", warning)


def published_split(sessions: pl.DataFrame, published: pl.DataFrame, valid_days: float) -> SplitResult:
    """Keep the dataset's split; carve valid from the end of train if it has none."""
    labels = sessions.select("session_id").join(published, on="session_id", how="left", maintain_order="left")
    unassigned = labels.filter(pl.col("split").is_null())
    if unassigned.height:
        raise ClickscoreError(f"{unassigned.height} session(s) (e.g. {unassigned['session_id'][0]!r}) are in no "
                              "split of the published split files; the files do not belong together")
    if (labels["split"] == "valid").any() or valid_days <= 0:
        return SplitResult(labels, "published")
    # No validation part published: the train sessions starting in its last days.
    train = sessions.filter(pl.Series(labels["split"] == "train"))
    if train.height == 0:
        return SplitResult(labels, "published", "the published split has no train sessions")
    train_end = train["end"].max()
    cut = train_end - int(valid_days * MS_PER_DAY)
    carved = train.filter(pl.col("start") >= cut)["session_id"]
    warning = None
    if carved.len() == 0 or carved.len() == train.height:
        carved = train.filter(pl.Series(_by_quantile(train, with_valid=False) == "test"))["session_id"]
        warning = (f"the published train part is too short to carve {valid_days:g} validation day(s): "
                   "its last 10% of sessions became valid")
    labels = labels.with_columns(
        pl.when(pl.col("session_id").is_in(carved.implode())).then(pl.lit("valid"))
        .otherwise(pl.col("split")).alias("split"))
    return SplitResult(labels, "published", warning)


def random_split(sessions: pl.DataFrame, share: float = 0.2, seed: int = 0) -> SplitResult:
    """Seeded random split by session (see module docstring); `sessions` from session_table."""
    if not 0 < share < 0.5:
        raise ClickscoreError(f"--random-split-share must be in (0, 0.5), got {share}")
    if sessions.height < 3:
        raise ClickscoreError(f"only {sessions.height} session(s): too few to split into train/valid/test")
    draw = np.random.default_rng(seed).random(sessions.height)        # (S,) one draw per session
    labels = np.where(draw < share, "test", np.where(draw < 2 * share, "valid", "train"))
    return SplitResult(sessions.select("session_id").with_columns(pl.Series("split", labels)),
                       "random", None)
