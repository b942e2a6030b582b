"""`clickscore simulate`: contract schema, determinism, realism and learnability."""
from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream.errors import ClickscoreError
from stream.events import EVENT_TYPES, MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, decode
from training.simulate import COLUMNS, SimulationConfig, run, simulate, write_events

CLICKSCORE = Path(sys.executable).parent / "clickscore"
CONTRACT_SCHEMA = pa.schema([
    ("session_id", pa.string()), ("event_type", pa.string()), ("item_id", pa.string()),
    ("category_id", pa.string()), ("price", pa.float64()), ("timestamp", pa.int64()),
    ("user_id", pa.string()), ("event_id", pa.string()), ("split", pa.string()),
])
START = "2026-01-05T00:00:00Z"   # a Monday: 14 days = two of each weekday


@pytest.fixture(scope="module")
def log() -> pl.DataFrame:
    return simulate(SimulationConfig(sessions=20_000, seed=0))


@pytest.fixture(scope="module")
def sessions(log: pl.DataFrame) -> pl.DataFrame:
    """One row per session, in file order."""
    return log.group_by("session_id", maintain_order=True).agg(
        events=pl.len(),
        first_timestamp=pl.col("timestamp").first(),
        buys=(pl.col("event_type") == "transaction").any(),
        split=pl.col("split").first(),
    )


def with_prefix_flags(log: pl.DataFrame) -> pl.DataFrame:
    """Adds `before_buy`: the event comes before its session's first transaction."""
    return log.with_columns(
        before_buy=((pl.col("event_type") == "transaction").cast(pl.Int32)
                    .cum_sum().over("session_id") == 0))


def test_columns_and_types_follow_the_contract(log, tmp_path):
    assert tuple(log.columns) == COLUMNS
    assert log.schema == pl.Schema({
        "session_id": pl.String, "event_type": pl.String, "item_id": pl.String,
        "category_id": pl.String, "price": pl.Float64, "timestamp": pl.Int64,
        "user_id": pl.String, "event_id": pl.String, "split": pl.String})
    assert log.null_count().sum_horizontal().item() == 0   # every field is simulated
    assert set(log["event_type"].unique()) == set(EVENT_TYPES)
    assert set(log["split"].unique()) == {"train", "valid", "test"}
    assert log["event_id"].n_unique() == log.height
    assert (log["price"] > 0).all()
    assert MIN_TIMESTAMP_MS <= log["timestamp"].min() and log["timestamp"].max() < MAX_TIMESTAMP_MS
    path = tmp_path / "events.parquet"
    write_events(log.head(1000), path)
    assert pq.read_schema(path).remove_metadata() == CONTRACT_SCHEMA


def test_rows_are_ordered_by_session_start_then_time(log, sessions):
    # Each session's rows are contiguous, sessions appear in order of their first event,
    # and the session ids are that order (so they carry nothing about the label).
    runs = log["session_id"].rle()
    assert runs.len() == sessions.height
    assert (sessions["first_timestamp"].diff().drop_nulls() >= 0).all()
    assert sessions["session_id"].to_list() == [f"s{i}" for i in range(sessions.height)]
    within = log.select(step=pl.col("timestamp").diff().over("session_id")).drop_nulls()
    assert (within["step"] > 0).all()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_format_reads_back_the_same_rows(tmp_path, suffix):
    log = simulate(SimulationConfig(sessions=300, seed=5))
    path = tmp_path / f"sim{suffix}"
    write_events(log, path)
    if suffix == ".csv":
        back = pl.read_csv(path, schema=log.schema)
    elif suffix == ".jsonl":
        back = pl.read_ndjson(path, schema=log.schema)
        # Each line is also a valid click event for the streaming side.
        for line in path.read_bytes().splitlines()[:200]:
            assert decode(line).event_type in EVENT_TYPES
    else:
        back = pl.read_parquet(path)
    assert back.equals(log)


def test_same_seed_same_file_and_other_seed_other_log(tmp_path):
    config = SimulationConfig(sessions=2000, seed=11)
    first, second = simulate(config), simulate(config)
    assert first.equals(second)
    write_events(first, tmp_path / "a.parquet")
    write_events(second, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    other = simulate(SimulationConfig(sessions=2000, seed=12))
    assert not other.select(COLUMNS[:6]).equals(first.select(COLUMNS[:6]))


@pytest.mark.parametrize("buy_share", [0.05, 0.2])
def test_buy_share_is_what_was_asked(buy_share):
    log = simulate(SimulationConfig(sessions=4000, seed=2, buy_share=buy_share))
    buying = log.filter(pl.col("event_type") == "transaction")["session_id"].n_unique()
    assert abs(buying / 4000 - buy_share) < 0.03


@pytest.mark.parametrize("buy_share", [0.0, 1.0])
def test_buy_share_extremes(buy_share):
    log = simulate(SimulationConfig(sessions=500, seed=4, buy_share=buy_share))
    buying = log.filter(pl.col("event_type") == "transaction")["session_id"].n_unique()
    assert buying == 500 * buy_share


def test_session_lengths_are_heavy_tailed(sessions):
    events = sessions["events"]
    assert (events > 100).mean() >= 0.008
    assert events.median() <= 6 < events.mean()
    assert events.max() > 300


def test_item_popularity_is_zipf_like(log):
    views = log.filter(pl.col("event_type") == "view")["item_id"].value_counts(sort=True)
    top = max(1, 5000 // 100)     # top 1% of the catalogue
    assert views["count"].head(top).sum() / views["count"].sum() > 0.25
    assert views.height > 2500     # while the long tail is still visited


def test_items_have_one_category_and_price(log):
    per_item = log.group_by("item_id").agg(pl.col("category_id").n_unique(), pl.col("price").n_unique())
    assert (per_item["category_id"] == 1).all() and (per_item["price"] == 1).all()
    # Prices cluster by category: most of the variance of log price is between categories.
    items = log.unique("item_id").with_columns(log_price=pl.col("price").log())
    within = items.with_columns(pl.col("log_price") - pl.col("log_price").mean().over("category_id"))
    assert within["log_price"].var() < 0.3 * items["log_price"].var()


def test_session_starts_have_daily_and_weekly_rhythm(sessions):
    starts = sessions.select(moment=pl.from_epoch("first_timestamp", time_unit="ms"))
    hours = starts["moment"].dt.hour().value_counts().sort("moment")
    count = dict(zip(hours["moment"].to_list(), hours["count"].to_list()))
    assert sum(count.get(h, 0) for h in (19, 20, 21)) > 3 * sum(count.get(h, 0) for h in (2, 3, 4))
    weekdays = starts["moment"].dt.weekday().value_counts()   # 1 = Monday .. 7 = Sunday
    count = dict(zip(weekdays["moment"].to_list(), weekdays["count"].to_list()))
    assert min(count[6], count[7]) > max(count[d] for d in range(1, 6))


def test_split_is_temporal(sessions):
    span = 14 * 86_400_000
    start = int(datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp() * 1000)
    offset = (sessions["first_timestamp"] - start) / span
    expected = np.select([offset >= 0.85, offset >= 0.70], ["test", "valid"], "train")
    assert sessions["split"].to_list() == expected.tolist()


def test_buying_sessions_end_with_transactions_on_carted_items(log, sessions):
    flagged = with_prefix_flags(log)
    buying = flagged.filter(pl.col("session_id").is_in(
        sessions.filter("buys")["session_id"].implode()))
    per_session = buying.group_by("session_id").agg(
        transactions=(pl.col("event_type") == "transaction").sum(),
        bought=pl.col("item_id").filter(pl.col("event_type") == "transaction"),
        carted=pl.col("item_id").filter(pl.col("event_type") == "addtocart"),
        # Transactions are a block at the end, strictly after every other event.
        tail_ok=(pl.col("event_type") == "transaction").cast(pl.Int8).diff().fill_null(0).ge(0).all(),
        last_prefix_time=pl.col("timestamp").filter("before_buy").max(),
        first_buy_time=pl.col("timestamp").filter(~pl.col("before_buy")).min(),
    )
    assert per_session["transactions"].is_between(1, 2).all()
    assert per_session["tail_ok"].all()
    assert (per_session["first_buy_time"] > per_session["last_prefix_time"]).all()
    for bought, carted in zip(per_session["bought"].to_list(), per_session["carted"].to_list()):
        assert len(set(bought)) == len(bought) and set(bought) <= set(carted)
    # Browsers never buy, some of them abandon a cart.
    browsing = log.filter(pl.col("session_id").is_in(sessions.filter(~pl.col("buys"))["session_id"].implode()))
    carts = browsing.filter(pl.col("event_type") == "addtocart")["session_id"].n_unique()
    assert 0.02 < carts / sessions.filter(~pl.col("buys")).height < 0.3


def test_prefix_fields_do_not_reveal_the_purchase(log, sessions):
    # Same fields filled, same id formats, one user per session, whether or not it buys.
    flagged = with_prefix_flags(log).filter("before_buy")
    assert flagged["event_type"].is_in(["view", "addtocart"]).all()
    per_session = flagged.group_by("session_id").agg(pl.col("user_id").n_unique())
    assert (per_session["user_id"] == 1).all()
    assert flagged["user_id"].str.contains(r"^u\d+$").all()
    assert flagged["event_id"].str.contains(r"^0-\d+$").all()


def buy_features(log: pl.DataFrame) -> pl.DataFrame:
    """Per-session aggregates of the events before the first transaction, and the label."""
    flagged = with_prefix_flags(log).with_columns(
        gap=pl.col("timestamp").diff().over("session_id") / 1000.0)
    label = flagged.group_by("session_id").agg(buys=(pl.col("event_type") == "transaction").any())
    prefix = flagged.filter("before_buy").group_by("session_id").agg(
        events=pl.len().log1p(),
        carts=(pl.col("event_type") == "addtocart").sum().log1p(),
        mean_gap=pl.col("gap").mean().fill_null(0.0).log1p(),
        mean_log_price=pl.col("price").log().mean(),
        categories=pl.col("category_id").n_unique(),
        split=pl.col("split").first(),
    )
    return prefix.join(label, on="session_id")


def test_buy_label_is_learnable_from_the_prefix(log):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    table = buy_features(log)
    names = ["events", "carts", "mean_gap", "mean_log_price", "categories"]
    train, test = table.filter(pl.col("split") == "train"), table.filter(pl.col("split") == "test")
    assert test["buys"].sum() > 50
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(train.select(names).to_numpy(), train["buys"].to_numpy())
    auc = roc_auc_score(test["buys"].to_numpy(), model.predict_proba(test.select(names).to_numpy())[:, 1])
    assert auc > 0.75


def next_item_pairs(log: pl.DataFrame) -> pl.DataFrame:
    return log.select(
        "split", current=pl.col("item_id"),
        next=pl.col("item_id").shift(-1).over("session_id")).drop_nulls()


def test_transitions_beat_popularity_for_the_next_item(log):
    pairs = next_item_pairs(log)
    train, test = pairs.filter(pl.col("split") == "train"), pairs.filter(pl.col("split") == "test")
    k = 20
    popular = log.filter(pl.col("split") == "train")["item_id"].value_counts(sort=True)["item_id"].head(k)
    popularity_recall = test["next"].is_in(popular.implode()).mean()
    # The k most frequent next items after each item in train (no back-off to popularity).
    top_next = (train.group_by("current", "next").len()
                .sort(["current", "len", "next"], descending=[False, True, False])
                .filter(pl.int_range(pl.len()).over("current") < k)
                .with_columns(hit=pl.lit(True)))
    transition_recall = (test.join(top_next, on=["current", "next"], how="left")["hit"]
                         .fill_null(False).mean())
    assert transition_recall > 0.3
    assert transition_recall > 2 * popularity_recall


def test_cli_writes_the_file_and_a_summary(tmp_path):
    out = tmp_path / "tmp.parquet"
    done = subprocess.run([str(CLICKSCORE), "simulate", "--sessions", "500", "--seed", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "500 sessions" in done.stdout and str(out) in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == CONTRACT_SCHEMA
    assert table.num_rows > 500
    assert pl.from_arrow(table).equals(simulate(SimulationConfig(sessions=500, seed=3)))


@pytest.mark.parametrize("flags, message", [
    (["--buy-share", "2"], "--buy-share"),
    (["--out", "sim.txt"], ".parquet, .csv, .jsonl"),
])
def test_cli_rejects_bad_arguments_with_exit_code_2(tmp_path, flags, message):
    argv = [str(CLICKSCORE), "simulate", "--sessions", "50", "--out", str(tmp_path / "sim.parquet")]
    if flags[0] == "--out":
        argv[-1] = str(tmp_path / flags[1])
    else:
        argv += flags
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "clickscore simulate: error:" in done.stderr and message in done.stderr
    assert not list(tmp_path.iterdir())     # nothing written


@pytest.mark.parametrize("change, message", [
    ({"sessions": 0}, "--sessions"),
    ({"items": 10, "categories": 50}, "--items"),
    ({"categories": 0}, "--categories"),
    ({"days": 0.0}, "--days"),
    ({"start": "next tuesday"}, "--start"),
    ({"buy_share": -0.1}, "--buy-share"),
])
def test_run_names_the_argument_to_fix(tmp_path, change, message):
    args = dict(sessions=10, seed=0, out=str(tmp_path / "x.parquet"), buy_share=0.05, items=100,
                categories=5, start=START, days=1.0)
    args.update(change)
    with pytest.raises(ClickscoreError, match=message):
        run(argparse.Namespace(**args))
