"""`clickscore prepare`: every reader on the real samples and on hand-made fixtures.

    /work/main/.venv/bin/python -m pytest tests/test_prepare.py -q

Expected counts come from the datasets README or are recomputed here with the csv
module, independently of the polars code under test.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

from pathlib import Path

import polars as pl
import pytest

from stream.errors import ClickscoreError
from training.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
YOOCHOOSE_100K = DATASETS / "yoochoose-100k"
COLUMNS = ["session_id", "event_type", "item_id", "category_id", "price", "timestamp", "user_id", "event_id", "split"]

needs_samples = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} not present")


def load(out: Path) -> tuple[pl.DataFrame, dict]:
    return pl.read_parquet(out / "events.parquet"), json.loads((out / "stats.json").read_text())


def check_contract(events: pl.DataFrame, stats: dict) -> None:
    """Invariants every prepared folder holds (docs/CONTRACTS.md)."""
    assert events.columns == COLUMNS
    assert events.schema["timestamp"] == pl.Int64 and events.schema["price"] == pl.Float64
    assert set(events["event_type"].unique()) <= {"view", "addtocart", "transaction"}
    assert set(events["split"].unique()) <= {"train", "valid", "test"}
    # One split per session: a test session's buy label never reaches training.
    assert events.group_by("session_id").agg(pl.col("split").n_unique())["split"].max() == 1
    # Sessions are contiguous, in order of their first event, and timestamps ascend inside each.
    runs = events.select((pl.col("session_id") != pl.col("session_id").shift(1)).fill_null(True).sum()).item()
    assert runs == events["session_id"].n_unique() == stats["sessions"]
    starts = events.group_by("session_id", maintain_order=True).agg(pl.col("timestamp").first())["timestamp"]
    assert starts.is_sorted()
    assert events.select((pl.col("timestamp").diff().over("session_id").fill_null(0) >= 0).all()).item()
    assert stats["events"] == events.height == sum(stats["splits"][s]["events"] for s in ("train", "valid", "test"))
    assert stats["buying_sessions"] == events.filter(pl.col("event_type") == "transaction")["session_id"].n_unique()
    assert (events["price"].drop_nulls() > 0).all()


# --- YOOCHOOSE -------------------------------------------------------------------

@needs_samples
def test_yoochoose_100k_keeps_the_published_split(tmp_path):
    stats = prepare("yoochoose", YOOCHOOSE_100K, tmp_path)
    events, written = load(tmp_path)
    check_contract(events, written)
    splits = stats["splits"]
    assert stats["split_method"] == "published"
    assert (splits["test"]["events"], splits["test"]["sessions"]) == (13_568, 3_416)
    # train + valid is exactly _train_full (README): 70,278 events, 17,794 sessions.
    assert splits["train"]["events"] + splits["valid"]["events"] == 70_278
    assert splits["train"]["sessions"] + splits["valid"]["sessions"] == 17_794
    # train is exactly _train_tr: 53,254 events in 13,629 sessions.
    assert (splits["train"]["events"], splits["train"]["sessions"]) == (53_254, 13_629)
    assert stats["buying_sessions"] == 0 and events["category_id"].null_count() == events.height
    assert events["price"].null_count() == events.height
    # Session 1's first click, raw 2014-04-07T10:51:09.277Z: the -2 h of session-rec undone.
    first = events.filter(pl.col("session_id") == "1").head(1)
    assert first["timestamp"].item() == 1396867869277 and first["split"].item() == "test"


@needs_samples
def test_yoochoose_train_full_and_test_only_carves_the_last_day(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for suffix in ("_train_full.txt", "_test.txt"):
        name = f"yoochoose-clicks-100k{suffix}"
        (source / name).symlink_to(YOOCHOOSE_100K / name)
    stats = prepare("yoochoose", source / "yoochoose-clicks-100k_test.txt", tmp_path / "out")
    events, _ = load(tmp_path / "out")
    splits = stats["splits"]
    assert stats["split_method"] == "published"
    assert splits["train"]["events"] + splits["valid"]["events"] == 70_278
    assert splits["test"]["events"] == 13_568 and splits["valid"]["sessions"] > 0
    starts = events.group_by("session_id").agg(pl.col("timestamp").min(), pl.col("split").first())
    train_end = events.filter(pl.col("split") != "test")["timestamp"].max()
    cut = train_end - 86_400_000
    assert (starts.filter(pl.col("split") == "valid")["timestamp"] >= cut).all()
    assert (starts.filter(pl.col("split") == "train")["timestamp"] < cut).all()


def test_yoochoose_raw_clicks_and_buys(tmp_path):
    stats = prepare("yoochoose", FIXTURES / "yoochoose", tmp_path)
    events, written = load(tmp_path)
    check_contract(events, written)
    assert stats["events"] == 15 + 3 and stats["sessions"] == 7 and stats["buying_sessions"] == 3
    assert stats["split_method"] == "temporal"
    # Log ends 2014-04-10 12:00: test starts >= 04-09 12:00, valid >= 04-08 12:00.
    split_of = dict(events.group_by("session_id").agg(pl.col("split").first()).iter_rows())
    assert split_of == {"1": "train", "2": "train", "3": "train", "4": "valid", "5": "valid",
                        "6": "test", "7": "test"}
    buys = events.filter(pl.col("event_type") == "transaction")
    assert buys["price"].to_list() == [1046.0, None, 523.0]   # price 0 = unknown
    assert events.filter(pl.col("session_id") == "1")["category_id"].null_count() == 4  # "0" = none
    assert sorted(events["category_id"].drop_nulls().unique()) == ["2053013552", "3", "S"]
    assert stats["test_items_unseen_in_train"] == 1           # 214999999, kept
    assert stats["test_events_unseen_item_share"] == 0.5


def _utc_ms(text: str) -> int:
    from datetime import datetime, timezone
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return round(moment.timestamp() * 1000)


@needs_samples
def test_yoochoose_prepared_times_align_with_raw_clicks(tmp_path):
    """Every click of a session in both the raw head and session-rec's split lands on its
    raw UTC time (session-rec kept the session ids; it dropped rare items, so compare
    the prepared clicks against the raw ones of the same session and item)."""
    raw: dict[tuple[str, str], list[int]] = {}
    with open(DATASETS / "yoochoose-raw" / "yoochoose-clicks.dat", newline="") as handle:
        rows = list(csv.reader(handle))
    for session, time, item, _ in rows:
        raw.setdefault((session, item), []).append(_utc_ms(time))
    prepare("yoochoose", YOOCHOOSE_100K, tmp_path)
    events, _ = load(tmp_path)
    # The head's last session is cut short by the head: left out.
    raw_sessions = {session for session, _ in raw} - {rows[-1][0]}
    shared = events.filter(pl.col("session_id").is_in(list(raw_sessions)))
    assert shared["session_id"].n_unique() > 500            # enough overlap to mean something
    for session, item, timestamp in shared.select("session_id", "item_id", "timestamp").iter_rows():
        assert timestamp in raw[(session, item)], (session, item, timestamp)


@needs_samples
def test_yoochoose_100k_with_buys_is_the_labelled_split(tmp_path, capsys):
    buys_file = DATASETS / "yoochoose-raw" / "yoochoose-buys.dat"
    stats = prepare("yoochoose", YOOCHOOSE_100K, tmp_path, buys=buys_file, complete_buys_below=22_000)
    events, written = load(tmp_path)
    check_contract(events, written)
    # The datasets README: 14,732 sessions below 22,000, 1,070 of them buy.
    assert (stats["sessions"], stats["buying_sessions"]) == (14_732, 1_070)
    assert stats["split_method"] == "published"
    assert (events["session_id"].cast(pl.Int64) < 22_000).all()
    # Recomputed with the csv module: buys whose session has no click in the split.
    with open(buys_file, newline="") as handle:
        buys = [row for row in csv.reader(handle)]
    sessions = set()
    for name in ("yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"):
        with open(YOOCHOOSE_100K / name, newline="") as handle:
            sessions |= {row["SessionId"] for row in csv.DictReader(handle, delimiter="\t")
                         if int(row["SessionId"]) < 22_000}
    kept = [row for row in buys if row[0] in sessions]
    below = [row for row in buys if int(row[0]) < 22_000]
    assert stats["buys_not_below_complete_buys"] == len(buys) - len(below)
    assert stats["buys_left_out"]["events"] == len(below) - len(kept)
    assert stats["buys_left_out"]["sessions"] == len({row[0] for row in below if row[0] not in sessions})
    transactions = events.filter(pl.col("event_type") == "transaction")
    assert transactions.height == len(kept)
    # Buys keep their own raw UTC times and prices (0 = unknown).
    expected = sorted((row[0], row[2], _utc_ms(row[1]), float(row[3]) if float(row[3]) > 0 else None)
                      for row in kept)
    got = sorted(transactions.select("session_id", "item_id", "timestamp", "price").iter_rows())
    assert got == expected
    assert stats["dropped_events"]["session_not_below_complete_buys"] > 0


def test_yoochoose_buys_options_fail_clearly(tmp_path):
    with pytest.raises(ClickscoreError, match="--buys .*no such file"):
        prepare("yoochoose", FIXTURES / "yoochoose", tmp_path, buys=tmp_path / "nope.dat")
    source = tmp_path / "clicks"
    source.mkdir()
    (source / "yoochoose-clicks.dat").write_text((FIXTURES / "yoochoose" / "yoochoose-clicks.dat").read_text())
    with pytest.raises(ClickscoreError, match="--complete-buys-below needs a buys file"):
        prepare("yoochoose", source, tmp_path / "out", complete_buys_below=5)
    with pytest.raises(ClickscoreError, match="for --dataset yoochoose only"):
        prepare("rees46", DATASETS / "rees46" / "2019-Oct-sample.csv", tmp_path / "out", complete_buys_below=5)


def test_yoochoose_raw_buys_join_only_clicked_sessions(tmp_path):
    """A buy of a session without clicks is counted, not made into a buy-only session;
    --complete-buys-below drops the higher session ids."""
    source = tmp_path / "in"
    source.mkdir()
    (source / "yoochoose-clicks.dat").write_text((FIXTURES / "yoochoose" / "yoochoose-clicks.dat").read_text())
    buys = (FIXTURES / "yoochoose" / "yoochoose-buys.dat").read_text()
    (source / "yoochoose-buys.dat").write_text(buys + "99,2014-04-02T10:00:00.000Z,214536502,10,1\n"
                                                       "99,2014-04-02T10:00:01.000Z,214536500,10,1\n")
    stats = prepare("yoochoose", source, tmp_path / "out")
    assert stats["buys_left_out"]["events"] == 2 and stats["buys_left_out"]["sessions"] == 1
    assert stats["sessions"] == 7 and stats["buying_sessions"] == 3
    stats = prepare("yoochoose", source, tmp_path / "low", complete_buys_below=4)
    events, _ = load(tmp_path / "low")
    assert sorted(events["session_id"].unique()) == ["1", "2", "3"]
    assert stats["buying_sessions"] == 2 and stats["sessions_not_below_complete_buys"] == 4


@needs_samples
def test_rees46_head_random_split_leaves_buyers_in_test(tmp_path):
    path = DATASETS / "rees46" / "2019-Oct-head.csv"
    stats = prepare("rees46", path, tmp_path / "a", split_method="random", split_seed=0)
    events, written = load(tmp_path / "a")
    check_contract(events, written)
    assert stats["split_method"] == "random" and stats["sessions"] == 5_066
    assert stats["buying_sessions"] == 200
    assert stats["splits"]["test"]["buying_sessions"] >= 30     # a temporal split leaves 4
    assert 0.15 < stats["splits"]["test"]["sessions"] / stats["sessions"] < 0.25
    again = prepare("rees46", path, tmp_path / "b", split_method="random", split_seed=0)
    assert again["splits"] == stats["splits"]
    other = prepare("rees46", path, tmp_path / "c", split_method="random", split_seed=1)
    assert other["splits"]["test"] != stats["splits"]["test"]


# --- Retail Rocket ---------------------------------------------------------------

def test_retailrocket_events_and_properties(tmp_path, capsys):
    stats = prepare("retailrocket", FIXTURES / "retailrocket", tmp_path)
    events, written = load(tmp_path)
    check_contract(events, written)
    # Visitor 1: a 31-min pause splits it in two; visitor 2: a 29-min pause does not.
    assert events["session_id"].unique(maintain_order=True).to_list() == ["1:0", "2:0", "1:1", "3:0"]
    assert stats["buying_sessions"] == 1 and stats["split_method"] == "temporal_quantile"
    categories = dict(events.select("item_id", "category_id").unique().iter_rows())
    assert categories == {"100": "2", "200": "3", "300": None}   # latest categoryid wins
    assert events["price"].null_count() == events.height         # "790" is hashed: no price
    assert events["event_id"].null_count() == events.height
    assert "split by session start instead" in capsys.readouterr().err
    assert any("split by session start instead" in w for w in stats["warnings"])


@needs_samples
def test_retailrocket_third_party_item_category(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "events.csv").write_text((FIXTURES / "retailrocket" / "events.csv").read_text())
    for name in ("item_category.csv", "category_tree.csv"):
        (source / name).symlink_to(DATASETS / "retailrocket" / name)
    stats = prepare("retailrocket", source, tmp_path / "out")
    events, _ = load(tmp_path / "out")
    with open(DATASETS / "retailrocket" / "item_category.csv", newline="") as handle:
        expected = {row["ItemId"]: row["categoryid"] for row in csv.DictReader(handle)
                    if row["ItemId"] in {"100", "200", "300"}}
    assert dict(events.select("item_id", "category_id").unique().iter_rows()) == {
        item: expected.get(item) for item in ("100", "200", "300")}
    assert stats["category_source"] == "item_category.csv"


# --- Diginetica, Taobao, REES46, OTTO (real samples) ------------------------------

@needs_samples
def test_diginetica_sample(tmp_path):
    folder = DATASETS / "diginetica"
    with open(folder / "sample_train-item-views.csv", newline="") as handle:
        views = list(csv.DictReader(handle, delimiter=";"))
    with open(folder / "train-purchases.csv", newline="") as handle:
        purchases = list(csv.DictReader(handle, delimiter=";"))
    viewed = {row["session_id"] for row in views}
    kept = [row for row in purchases if row["sessionId"] in viewed]
    stats = prepare("diginetica", folder, tmp_path)
    events, written = load(tmp_path)
    check_contract(events, written)
    assert (len(views), len(viewed), len({r["sessionId"] for r in kept})) == (12_391, 2_986, 138)
    assert stats["events"] == len(views) + len(kept)
    assert stats["sessions"] == 2_986 and stats["buying_sessions"] == 138
    assert stats["dropped_purchases_without_views"] == len(purchases) - len(kept)
    session_1 = events.filter(pl.col("session_id") == "1")
    assert session_1["timestamp"].min() == 1462752000000 + 75848      # 2016-05-09 + timeframe
    assert session_1["category_id"].null_count() == 0 and session_1["user_id"].null_count() == session_1.height


@needs_samples
def test_taobao_sample(tmp_path):
    path = DATASETS / "taobao-userbehavior" / "UserBehavior_head.csv"
    with open(path, newline="") as handle:
        rows = [(int(u), int(t), b) for u, _, _, b, t in csv.reader(handle)]
    low, high = 1_511_539_200, 1_512_316_800       # the published period, UTC+8
    in_period = sorted((r for r in enumerate(rows) if low <= r[1][1] < high), key=lambda r: (r[1][0], r[1][1], r[0]))
    session_of, previous, count = {}, None, 0
    for index, (user, time, _) in in_period:
        if previous is None or previous[0] != user or time - previous[1] > 1800:
            count += 1
        session_of[index] = count
        previous = (user, time)
    kept = {i: s for i, s in session_of.items() if rows[i][2] != "fav"}
    stats = prepare("taobao", path, tmp_path, test_days=1)
    events, written = load(tmp_path)
    check_contract(events, written)
    assert stats["events"] == len(kept)
    assert stats["sessions"] == len(set(kept.values()))
    assert stats["buying_sessions"] == len({s for i, s in kept.items() if rows[i][2] == "buy"}) == 1_344
    assert stats["dropped_events"] == {"outside_published_period": len(rows) - len(in_period),
                                       "fav": sum(1 for i in session_of if rows[i][2] == "fav")}
    assert stats["split_method"] == "temporal" and stats["session_gap_minutes"] == 30.0


@needs_samples
def test_rees46_sample(tmp_path):
    path = DATASETS / "rees46" / "2019-Oct-sample.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if r["event_type"] != "remove_from_cart" and r["user_session"]]
    stats = prepare("rees46", path, tmp_path)   # the folder also holds the longer head
    events, written = load(tmp_path)
    check_contract(events, written)
    assert stats["events"] == len(kept) == 1_000 and stats["sessions"] == 372
    assert events.filter(pl.col("event_type") == "transaction").height == 10
    assert stats["buying_sessions"] == len({r["user_session"] for r in kept if r["event_type"] == "purchase"})
    first = events.filter(pl.col("item_id") == "44600062").head(1)
    assert first["price"].item() == 35.79 and first["timestamp"].item() == 1569888000000
    assert first["category_id"].item() == "2103807459595387724" and first["user_id"].item() == "541312140"


@needs_samples
def test_otto_sample(tmp_path):
    path = DATASETS / "otto" / "train.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    stats = prepare("otto", path, tmp_path)
    events, written = load(tmp_path)
    check_contract(events, written)
    assert stats["events"] == sum(len(s["events"]) for s in lines) == 862
    assert stats["sessions"] == 20
    assert stats["buying_sessions"] == sum(any(e["type"] == "orders" for e in s["events"]) for s in lines) == 3
    assert events["timestamp"].min() == min(e["ts"] for s in lines for e in s["events"])


def test_otto_seconds_are_detected(tmp_path):
    path = tmp_path / "otto_seconds.jsonl"
    path.write_text("\n".join(json.dumps({"session": s, "events": [
        {"aid": 10 + i, "ts": 1659304800 + 86_400 * s + 60 * i, "type": t}
        for i, t in enumerate(["clicks", "carts", "orders"])]}) for s in range(12)) + "\n")
    prepare("otto", path, tmp_path / "out")
    events, stats = load(tmp_path / "out")
    assert events["timestamp"].min() == 1659304800000 and stats["ts_unit"] == "s"


# --- canonical ---------------------------------------------------------------------

def test_canonical_round_trip_keeps_the_split(tmp_path):
    prepare("yoochoose", FIXTURES / "yoochoose", tmp_path / "a")
    original, _ = load(tmp_path / "a")
    stats = prepare("canonical", tmp_path / "a" / "events.parquet", tmp_path / "b")
    again, _ = load(tmp_path / "b")
    assert stats["split_method"] == "from_input"
    # The input's split has a valid part: no days were used to make it.
    assert "test_days" not in stats and "valid_days" not in stats
    assert again.equals(original)


def test_canonical_csv_with_iso_times_and_aliases(tmp_path):
    path = tmp_path / "log.csv"
    lines = ["session_id,event_type,item_id,timestamp,price,extra"]
    for s in range(10):
        lines += [f"s{s},click,i{s},2026-01-0{1 + s % 9}T10:00:00Z,", f"s{s},buy,i{s},{1767261600000 + s * 86_400_000 + 5},9.5,x"]
    path.write_text("\n".join(lines) + "\n")
    stats = prepare("canonical", path, tmp_path / "out")
    events, _ = load(tmp_path / "out")
    assert set(events["event_type"]) == {"view", "transaction"} and stats["buying_sessions"] == 10
    assert events.filter(pl.col("session_id") == "s0")["timestamp"].to_list() == [1767261600000, 1767261600005]
    assert events["price"].drop_nulls().to_list() == [9.5] * 10
    assert any("extra" in w for w in stats["warnings"])


@pytest.mark.parametrize("body, message", [
    ("session_id,item_id,timestamp\ns,i,1767261600000\n", "lacks column(s) ['event_type']"),
    ("session_id,event_type,item_id,timestamp,split\ns,view,i,1767261600000,train\ns,view,j,1767261600001,test\n",
     "several splits"),
    ("session_id,event_type,item_id,timestamp\ns,wishlist,i,1767261600000\n", "yields no events"),
])
def test_canonical_rejects_bad_input(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ClickscoreError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        prepare("canonical", path, tmp_path / "out")


# --- errors and the command line -----------------------------------------------------

def test_wrong_dataset_for_the_folder_says_so(tmp_path):
    with pytest.raises(ClickscoreError, match="looks like --dataset yoochoose"):
        prepare("diginetica", FIXTURES / "yoochoose", tmp_path)
    with pytest.raises(ClickscoreError, match="does not exist"):
        prepare("otto", tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(ClickscoreError, match="unknown dataset"):
        prepare("movielens", FIXTURES / "yoochoose", tmp_path)
    with pytest.raises(ClickscoreError, match="does not look like Taobao"):
        prepare("taobao", FIXTURES / "yoochoose" / "yoochoose-clicks.dat", tmp_path)


def test_cli_end_to_end(tmp_path):
    cli = Path(sys.executable).parent / "clickscore"
    done = subprocess.run([str(cli), "prepare", "--dataset", "retailrocket", "--input", str(FIXTURES / "retailrocket"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    header, *rows = [line.split()[0] for line in done.stdout.splitlines()[1:6]]
    assert header == "split" and rows == ["all", "train", "valid", "test"]
    events, stats = load(tmp_path / "out")
    assert stats["dataset"] == "retailrocket" and events.height == 8
    bad = subprocess.run([str(cli), "prepare", "--dataset", "yoochoose", "--input", str(tmp_path / "nowhere"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


# -- malformed rows: left out, counted by reason, reported with their line numbers ------

GOOD_CANONICAL = "s{n},view,i{n},{ts}"


def malformed(stats: dict) -> tuple[dict, list[tuple[str, int, str]]]:
    report = stats["malformed_rows"]
    assert report["count"] == sum(report["by_reason"].values())
    return report["by_reason"], [(r["file"], r.get("line", r.get("row")), r["reason"]) for r in report["first"]]


def test_canonical_bad_rows_are_reported_by_line(tmp_path):
    lines = ["session_id,event_type,item_id,timestamp,price"]
    lines += [f"s{n},view,i{n},{1767261600000 + n},1.5" for n in range(20)]
    lines.insert(4, "s90,wishlist,i1,1767261600000,1")          # line 5
    lines.insert(8, "s91,view,i1,1767261600,1")                 # line 9: seconds, not ms
    lines.insert(12, "s92,view,i1,1767261600000,-1")            # line 13
    lines.insert(15, "s93,view,,1767261600000,1")               # line 16
    lines.insert(18, "s94,view,i1,yesterday,1")                 # line 19
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    stats = prepare("canonical", path, tmp_path / "out")
    by_reason, first = malformed(stats)
    assert first == [("log.csv", 5, "unknown_event_type"), ("log.csv", 9, "timestamp_out_of_range"),
                     ("log.csv", 13, "bad_price"), ("log.csv", 16, "missing_item_id"),
                     ("log.csv", 19, "bad_timestamp")]
    assert stats["events"] == 20
    assert not {"s90", "s91", "s92", "s93", "s94"} & set(load(tmp_path / "out")[0]["session_id"])


def test_canonical_parquet_bad_rows_are_reported_by_row(tmp_path):
    frame = pl.DataFrame({"session_id": [f"s{n}" for n in range(30)],
                          "event_type": ["view", "nope"] + ["view"] * 28,
                          "item_id": ["1"] * 30, "timestamp": [1767261600000 + n for n in range(30)]})
    frame.write_parquet(tmp_path / "log.parquet")
    stats = prepare("canonical", tmp_path / "log.parquet", tmp_path / "out")
    assert malformed(stats)[1] == [("log.parquet", 2, "unknown_event_type")]
    assert stats["events"] == 29


def test_yoochoose_raw_bad_lines(tmp_path):
    clicks = (FIXTURES / "yoochoose" / "yoochoose-clicks.dat").read_text().splitlines()
    good = len(clicks)
    clicks.insert(2, "17,2014-04-07T10:51:09.277Z,notanitem,0")   # line 3
    clicks.insert(5, "18,yesterday,214536502,0")                  # line 6
    clicks.insert(7, "19,2014-04-07T10:51:09.277Z,214536502,0,extra")   # line 8
    clicks.insert(9, "20")                                        # line 10
    (tmp_path / "yoochoose-clicks.dat").write_text("\n".join(clicks) + "\n")
    (tmp_path / "yoochoose-buys.dat").write_text((FIXTURES / "yoochoose" / "yoochoose-buys.dat").read_text())
    stats = prepare("yoochoose", tmp_path, tmp_path / "out")
    by_reason, first = malformed(stats)
    assert first == [("yoochoose-clicks.dat", 3, "bad_item"), ("yoochoose-clicks.dat", 6, "bad_time"),
                     ("yoochoose-clicks.dat", 8, "too_many_fields"), ("yoochoose-clicks.dat", 10, "missing_time")]
    events = load(tmp_path / "out")[0]
    assert events.filter(pl.col("event_type") == "view").height == good


def test_session_rec_bad_line(tmp_path):
    source = DATASETS / "yoochoose-100k"
    full = (source / "yoochoose-clicks-100k_train_full.txt").read_text().splitlines()[:301]
    full.insert(100, "999999\t214536502\tnot-a-time")    # line 101
    (tmp_path / "x_train_full.txt").write_text("\n".join(full) + "\n")
    test = (source / "yoochoose-clicks-100k_test.txt").read_text().splitlines()[:51]
    (tmp_path / "x_test.txt").write_text("\n".join(test) + "\n")
    stats = prepare("yoochoose", tmp_path, tmp_path / "out")
    assert malformed(stats)[1] == [("x_train_full.txt", 101, "bad_Time")]
    assert stats["events"] == 300 + 50


def test_taobao_bad_lines(tmp_path):
    lines = (DATASETS / "taobao-userbehavior" / "UserBehavior_head.csv").read_text().splitlines()[:500]
    lines.insert(9, "1,2268318,2520377,wishlist,1511544070")   # line 10
    lines.insert(19, "1,x,2520377,pv,1511544070")             # line 20
    lines.insert(29, "1,2268318")                             # line 30
    (tmp_path / "UserBehavior.csv").write_text("\n".join(lines) + "\n")
    stats = prepare("taobao", tmp_path, tmp_path / "out")
    assert malformed(stats)[1] == [("UserBehavior.csv", 10, "unknown_behavior_type"),
                                   ("UserBehavior.csv", 20, "bad_item"), ("UserBehavior.csv", 30, "missing_category")]


def test_diginetica_and_retailrocket_bad_lines(tmp_path):
    views = (DATASETS / "diginetica" / "sample_train-item-views.csv").read_text().splitlines()[:400]
    views.insert(50, "7;NA;81766;abc;2016-05-09")              # line 51
    views.insert(60, "7;NA;81766;526309;09/05/2016")           # line 61
    digi = tmp_path / "digi"
    digi.mkdir()
    (digi / "train-item-views.csv").write_text("\n".join(views) + "\n")
    stats = prepare("diginetica", digi, tmp_path / "out-digi")
    assert malformed(stats)[1] == [("train-item-views.csv", 51, "bad_timeframe"),
                                   ("train-item-views.csv", 61, "bad_eventdate")]
    rr = tmp_path / "rr"
    rr.mkdir()
    events = (FIXTURES / "retailrocket" / "events.csv").read_text().splitlines()
    events.insert(3, "1433221332117,257597,wishlist,355908,")   # line 4
    (rr / "events.csv").write_text("\n".join(events) + "\n")
    stats = prepare("retailrocket", rr, tmp_path / "out-rr")
    assert malformed(stats)[1] == [("events.csv", 4, "unknown_event")]


def test_rees46_and_otto_bad_lines(tmp_path):
    rows = (DATASETS / "rees46" / "2019-Oct-sample.csv").read_text().splitlines()
    rows.insert(10, "2019-10-01 00:00:00 UTC,teleport,44600062,1,,b,35.79,541312140,x")   # line 11
    rows.insert(20, "yesterday,view,44600062,1,,b,35.79,541312140,x")                     # line 21
    rees = tmp_path / "rees"
    rees.mkdir()
    (rees / "2019-Oct.csv").write_text("\n".join(rows) + "\n")
    stats = prepare("rees46", rees, tmp_path / "out-rees")
    assert malformed(stats)[1] == [("2019-Oct.csv", 11, "unknown_event_type"), ("2019-Oct.csv", 21, "bad_event_time")]
    lines = (DATASETS / "otto" / "train.jsonl").read_text().splitlines()
    lines.insert(3, '{"session": 99, "events": [')                                   # line 4
    lines.insert(7, '{"session": 98, "events": [{"aid": 1, "ts": 1659304800025, "type": "wish"}]}')  # line 8
    (tmp_path / "otto.jsonl").write_text("\n".join(lines) + "\n")
    stats = prepare("otto", tmp_path / "otto.jsonl", tmp_path / "out-otto")
    assert malformed(stats)[1] == [("otto.jsonl", 4, "invalid_json"), ("otto.jsonl", 8, "unknown_event_type")]
    assert stats["events"] == 862


def test_cli_prints_malformed_rows_with_line_numbers(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("session_id,event_type,item_id,timestamp\n"
                    + "".join(f"s{n},view,i,{1767261600000 + n}\n" for n in range(30)) + "s,view,i,oops\n")
    done = subprocess.run([str(Path(sys.executable).parent / "clickscore"), "prepare", "--dataset", "canonical",
                           "--input", str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 malformed rows left out (bad_timestamp 1)" in done.stderr
    assert "log.csv:32: bad_timestamp: s,view,i,oops" in done.stderr


def test_more_bad_rows_every_format(tmp_path):
    # yoochoose buys: negative price, blank line; clicks clean.
    src = tmp_path / "yc"
    src.mkdir()
    (src / "yoochoose-clicks.dat").write_text((FIXTURES / "yoochoose" / "yoochoose-clicks.dat").read_text())
    buys = (FIXTURES / "yoochoose" / "yoochoose-buys.dat").read_text().splitlines()
    buys.insert(1, "3,2014-04-08T12:00:00.000Z,214536502,-5,1")   # line 2
    buys.insert(2, "")                                            # line 3
    (src / "yoochoose-buys.dat").write_text("\n".join(buys) + "\n")
    stats = prepare("yoochoose", src, tmp_path / "out-yc")
    assert malformed(stats)[1] == [("yoochoose-buys.dat", 2, "bad_price"), ("yoochoose-buys.dat", 3, "blank_line")]
    assert stats["events"] == 15 + 3
    # rees46, two files: a negative price and a short row in the second file.
    rees = tmp_path / "rees"
    rees.mkdir()
    rows = (DATASETS / "rees46" / "2019-Oct-sample.csv").read_text().splitlines()
    (rees / "2019-Nov.csv").write_text("\n".join(rows[:1] + rows[1:201]) + "\n")
    tail = rows[:1] + rows[201:]
    tail.insert(5, "2019-10-01 00:00:00 UTC,view,44600062,1,,b,-3,541312140,x")   # line 6
    tail.insert(9, "2019-10-01 00:00:00 UTC")                                      # line 10
    (rees / "2019-Oct.csv").write_text("\n".join(tail) + "\n")
    stats = prepare("rees46", rees, tmp_path / "out-rees")
    assert malformed(stats)[1] == [("2019-Oct.csv", 6, "bad_price"), ("2019-Oct.csv", 10, "missing_event_type")]
    assert stats["events"] == 1_000
    # taobao: too many fields, a stray quote must not swallow the following lines.
    lines = (DATASETS / "taobao-userbehavior" / "UserBehavior_head.csv").read_text().splitlines()[:300]
    lines.insert(4, '1,"2268318,2520377,pv,1511544070')       # line 5
    lines.insert(6, "1,2268318,2520377,pv,1511544070,9")      # line 7
    (tmp_path / "UserBehavior.csv").write_text("\n".join(lines) + "\n")
    stats = prepare("taobao", tmp_path / "UserBehavior.csv", tmp_path / "out-tb")
    assert malformed(stats)[1] == [("UserBehavior.csv", 5, "bad_item"), ("UserBehavior.csv", 7, "too_many_fields")]
    # OTTO: a blank line, an event without aid, a value of the wrong type.
    otto = (DATASETS / "otto" / "train.jsonl").read_text().splitlines()
    otto.insert(1, "")                                                                      # line 2
    otto.insert(2, '{"session": 97, "events": [{"ts": 1659304800025, "type": "clicks"}]}')  # line 3
    otto.insert(4, '{"session": "x", "events": []}')                                        # line 5
    (tmp_path / "o.jsonl").write_text("\n".join(otto) + "\n")
    stats = prepare("otto", tmp_path / "o.jsonl", tmp_path / "out-otto")
    assert malformed(stats)[1] == [("o.jsonl", 2, "blank_line"), ("o.jsonl", 3, "missing_aid"),
                                   ("o.jsonl", 5, "bad_value")]
    assert stats["events"] == 862


def test_canonical_csv_and_jsonl_structural_bad_rows(tmp_path):
    good = [f"s{n},view,i{n},{1767261600000 + n}" for n in range(20)]
    lines = ["session_id,event_type,item_id,timestamp", *good]
    lines.insert(3, "s90,view,i1,1767261600000,extra")     # line 4
    lines.insert(6, "s91,view")                             # line 7
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    stats = prepare("canonical", tmp_path / "log.csv", tmp_path / "out")
    assert malformed(stats)[1] == [("log.csv", 4, "too_many_fields"), ("log.csv", 7, "missing_item_id")]
    assert stats["events"] == 20 and stats["split_method"] != "from_input"
    records = [json.dumps({"session_id": f"s{n}", "event_type": "view", "item_id": f"i{n}",
                           "timestamp": 1767261600000 + n, "split": "train" if n < 15 else "test"})
               for n in range(20)]
    records.insert(2, '{"session_id": "s90", "event_type": ')                              # line 3
    records.insert(5, json.dumps({"session_id": "s91", "event_type": "view", "item_id": "i",
                                  "timestamp": "soon", "split": "train"}))                  # line 6
    (tmp_path / "log.jsonl").write_text("\n".join(records) + "\n")
    stats = prepare("canonical", tmp_path / "log.jsonl", tmp_path / "out-j")
    assert malformed(stats)[1] == [("log.jsonl", 3, "invalid_json"), ("log.jsonl", 6, "bad_timestamp")]
    assert stats["events"] == 20 and stats["split_method"] == "from_input"
    assert stats["valid_days"] == 7.0 and "test_days" not in stats
    with pytest.raises(ClickscoreError, match="lacks column"):
        (tmp_path / "x.jsonl").write_text('{"session_id": "s", "item_id": "i", "timestamp": 1767261600000}\n')
        prepare("canonical", tmp_path / "x.jsonl", tmp_path / "out-x")


def test_one_bad_row_never_fails_the_file(tmp_path):
    """A bad first line, a byte that is not UTF-8, a stray quote, a bad split value, a bad
    category_tree row, a negative timeframe: each is one reported row, not a failed file."""
    def reported(stats):
        return malformed(stats)[1]
    # YOOCHOOSE raw: a bad first line (the layout check looks at several lines) and a non-UTF-8 byte.
    yc = tmp_path / "yc"
    yc.mkdir()
    clicks = (FIXTURES / "yoochoose" / "yoochoose-clicks.dat").read_bytes().splitlines()
    good = len(clicks)
    clicks.insert(0, b"garbage")                                          # line 1
    clicks.insert(4, b"5,2014-04-07T10:51:09.277Z,214536502,\xff\xfe")    # line 5
    (yc / "yoochoose-clicks.dat").write_bytes(b"\n".join(clicks) + b"\n")
    stats = prepare("yoochoose", yc, tmp_path / "out-yc")
    assert reported(stats) == [("yoochoose-clicks.dat", 1, "missing_time"), ("yoochoose-clicks.dat", 5, "bad_encoding")]
    assert stats["events"] == good
    # Taobao and OTTO: a bad first line.
    lines = (DATASETS / "taobao-userbehavior" / "UserBehavior_head.csv").read_text().splitlines()[:300] \
        if DATASETS.is_dir() else []
    if lines:
        (tmp_path / "UserBehavior.csv").write_text("\n".join(["1,2,3,wish,5", *lines]) + "\n")
        stats = prepare("taobao", tmp_path / "UserBehavior.csv", tmp_path / "out-tb")
        assert reported(stats) == [("UserBehavior.csv", 1, "unknown_behavior_type")]
        otto = (DATASETS / "otto" / "train.jsonl").read_text().splitlines()
        (tmp_path / "o.jsonl").write_text("\n".join(["oops", *otto]) + "\n")
        stats = prepare("otto", tmp_path / "o.jsonl", tmp_path / "out-otto")
        assert reported(stats) == [("o.jsonl", 1, "invalid_json")] and stats["events"] == 862
    # Canonical CSV: a stray quote (blanked, the lines after it keep their numbers) and a bad split.
    rows = [f"s{n},view,i{n},{1767261600000 + n},{'train' if n < 15 else 'test'}" for n in range(20)]
    lines = ["session_id,event_type,item_id,timestamp,split", *rows]
    lines.insert(3, 's90,view,"i9,1767261600000,train')                  # line 4
    lines.insert(8, "s91,view,i1,1767261600000,tst")                     # line 9
    lines.insert(12, 's92,view,"i,9",1767261600000,train')               # line 13: quoted, fine
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    stats = prepare("canonical", tmp_path / "log.csv", tmp_path / "out-csv")
    assert reported(stats) == [("log.csv", 4, "unbalanced_quote"), ("log.csv", 9, "bad_split")]
    events = load(tmp_path / "out-csv")[0]
    assert stats["events"] == 21 and "i,9" in set(events["item_id"])
    # Canonical JSON lines: a broken first line; the columns come from the lines after it.
    records = [json.dumps({"session_id": f"s{n}", "event_type": "view", "item_id": "i",
                           "timestamp": 1767261600000 + n}) for n in range(20)]
    (tmp_path / "log.jsonl").write_text("\n".join(['{"session_id": "s9", ', *records]) + "\n")
    stats = prepare("canonical", tmp_path / "log.jsonl", tmp_path / "out-j")
    assert reported(stats) == [("log.jsonl", 1, "invalid_json")] and stats["events"] == 20
    # Retail Rocket: a bad category_tree row is reported, not a parser error.
    rr = tmp_path / "rr"
    rr.mkdir()
    for name in ("events.csv", "item_properties_part1.csv", "item_properties_part2.csv"):
        (rr / name).write_text((FIXTURES / "retailrocket" / name).read_text())
    tree = (FIXTURES / "retailrocket" / "category_tree.csv").read_text().splitlines()
    tree.insert(2, "1,2,3")                                               # line 3
    (rr / "category_tree.csv").write_text("\n".join(tree) + "\n")
    stats = prepare("retailrocket", rr, tmp_path / "out-rr")
    assert reported(stats) == [("category_tree.csv", 3, "too_many_fields")] and stats["events"] == 8


@needs_samples
def test_diginetica_negative_timeframe_and_session_rec_tuning_file(tmp_path):
    views = (DATASETS / "diginetica" / "sample_train-item-views.csv").read_text().splitlines()[:200]
    views.insert(30, "7;NA;81766;-5;2016-05-09")                          # line 31
    (tmp_path / "train-item-views.csv").write_text("\n".join(views) + "\n")
    stats = prepare("diginetica", tmp_path / "train-item-views.csv", tmp_path / "out-digi")
    assert malformed(stats)[1] == [("train-item-views.csv", 31, "bad_timeframe")] and stats["events"] == 199
    source = DATASETS / "yoochoose-100k"
    sr = tmp_path / "sr"
    sr.mkdir()
    for suffix, keep in (("_train_full.txt", 301), ("_test.txt", 51), ("_train_tr.txt", 201), ("_train_valid.txt", 51)):
        lines = (source / f"yoochoose-clicks-100k{suffix}").read_text().splitlines()[:keep]
        if suffix == "_train_tr.txt":
            lines.insert(10, "x\t214536502\t1396839069.277")              # line 11
        (sr / f"x{suffix}").write_text("\n".join(lines) + "\n")
    stats = prepare("yoochoose", sr, tmp_path / "out-sr")
    assert malformed(stats)[1] == [("x_train_tr.txt", 11, "bad_SessionId")] and stats["events"] == 350
