"""`clickscore tail` on the real embedded broker: a real `clickscore worker` (the shipped
default model) scores a small simulated log with malformed messages among it, then
`clickscore tail` reads every output topic as a subprocess; plus the formatting of
arbitrary bytes as pure functions."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import CLICKSCORE, WorkerProcess, produce, read_topic  # noqa: E402
from conftest import free_port  # noqa: E402
from stream.tail import TailRecord, format_human, format_json, parse_partitions  # noqa: E402

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x1b]")
RULES = """
[[rule]]
name = "always_hot"
kind = "high_intent"
fire_above = 0.001
rearm_below = 0.0005
"""
MALFORMED = [  # (key, value, reason)
    (b"bad-1", b"\xff\xfe\x1b[31m not utf-8", "undecodable"),
    (b"bad-2", b'{"session_id": "bad-2", "event_type": ', "invalid_json"),
    (b"bad-3", json.dumps({"session_id": "bad-3", "event_type": "wishlist", "item_id": "1",
                           "timestamp": 1767571253772}).encode(), "unknown_event_type"),
]


def tail(broker: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CLICKSCORE, "tail", "--broker", broker, *argv], capture_output=True,
                          text=True, timeout=timeout)


def tail_json(broker: str, *argv: str) -> list[dict]:
    done = tail(broker, "--json", *argv)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# --------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("key,value", [
    (b"s1", b"\x00\x01\x1b[2J\x7f\xff"), (None, None), (b"\xff", "é ☃ \u2028 \t".encode()),
    (b"k", b'{"a": "\\u001b[31m"}'), (b"k", b'"just a json string"'), (b"", b""),
    (b"s", json.dumps({"reason": "undecodable", "original_b64": base64.b64encode(b"\x1b\xff").decode(),
                       "detail": "x\ny"}).encode()),
    (b"s", json.dumps({"reason": "x", "original_b64": "%%%not base64"}).encode()),
    (b"s", json.dumps({"reason": "oversized_message", "original_b64": base64.b64encode(b"ab").decode(),
                       "original_bytes": 70000, "original_truncated": True}).encode()),
    (b"s", json.dumps({"reason": "x", "original_b64": "", "original_bytes": "?", "original_truncated": 1}).encode()),
    (b"s", json.dumps({"items": ["a\x1b", 3], "session_id": "s\n"}).encode()),
])
def test_any_bytes_give_one_clean_line_and_round_trip_in_json(key, value):
    record = TailRecord(partition=1, offset=7, timestamp=1767571253772, key=key, value=value)
    human = format_human(record)
    assert "\n" not in human and not CONTROL.search(human), human
    assert human.startswith("2026-01-05T00:00:53.772Z  1:7 ")
    line = format_json(record)
    assert "\n" not in line
    decoded = json.loads(line)
    assert (decoded["partition"], decoded["offset"], decoded["timestamp"]) == (1, 7, 1767571253772)
    raw_key = base64.b64decode(decoded["key_b64"]) if "key_b64" in decoded else \
        (None if decoded["key"] is None else decoded["key"].encode())
    assert raw_key == key
    if "value_b64" in decoded:
        assert base64.b64decode(decoded["value_b64"]) == value
    elif value is None:
        assert decoded["value"] is None
    else:
        text = value.decode()
        try:
            assert decoded["value"] == json.loads(text)
        except ValueError:
            assert decoded["value"] == text


def test_partition_list_parses_and_refuses_nonsense():
    import argparse

    assert parse_partitions("2,0,2") == (0, 2) and parse_partitions("") == ()
    for bad in ("a", "-1", "1;2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_partitions(bad)


# --------------------------------------------------------------------------- real broker + worker

@pytest.fixture(scope="module")
def scored(broker, tmp_path_factory):
    """Topics of one real worker run over 40 simulated sessions and the malformed messages:
    (topic names, the input events, every output record as read by kafka-python)."""
    tmp = tmp_path_factory.mktemp("tail")
    run = uuid.uuid4().hex[:8]
    t = {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    sim = tmp / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "40", "--seed", "3", "--out", str(sim)],
                   check=True, capture_output=True)
    events = []
    for i, row in enumerate(pl.read_parquet(sim).sort("timestamp", maintain_order=True).iter_rows(named=True)):
        event = {k: v for k, v in row.items() if v is not None and k != "split"}
        event["event_id"] = f"e{i}"
        events.append(event)
    records = [(e["session_id"].encode(), json.dumps(e).encode()) for e in events]
    step = len(records) // (len(MALFORMED) + 1)
    for i, (key, value, _) in enumerate(MALFORMED):
        records.insert((i + 1) * step + i, (key, value))
    (tmp / "rules.toml").write_text(RULES)
    worker = WorkerProcess(broker, REPO / "onnx_models" / "default", t, f"app-{run}", tmp / "worker.log",
                           free_port(), ["--rules", str(tmp / "rules.toml"), "--top-k", "7"])
    with worker:
        produce(broker, t["input"], records)
        out = {"next_items": read_topic(broker, t["next_items"], lambda r: len(r) >= len(events), timeout=180)}
        out["dlq"] = read_topic(broker, t["dlq"], lambda r: len(r) >= len(MALFORMED), timeout=60)
        out["scores"] = read_topic(broker, t["scores"], lambda r: len(r) > 0, timeout=60, settle=2)
        out["triggers"] = read_topic(broker, t["triggers"], lambda r: len(r) > 0, timeout=60, settle=2)
        assert worker.proc.poll() is None, worker.log()[-3000:]
    assert len(out["next_items"]) == len(events) and len(out["dlq"]) == len(MALFORMED)
    return t, events, out


def _by_position(records) -> dict[tuple[int, int], dict]:
    return {(r.partition, r.offset): json.loads(r.value) for r in records}


@pytest.mark.parametrize("name", ["scores", "next_items", "dlq", "triggers"])
def test_json_lines_hold_every_record_of_each_output_topic(broker, scored, name):
    t, _, out = scored
    lines = tail_json(broker, t[name])
    # Exits by itself at the end, with each record once, decoded, key = session id.
    assert {(x["partition"], x["offset"]): x["value"] for x in lines} == _by_position(out[name])
    assert len(lines) == len(out[name])
    assert all(x["key"] == r.key.decode() for x, r in
               zip(sorted(lines, key=lambda x: (x["partition"], x["offset"])),
                   sorted(out[name], key=lambda r: (r.partition, r.offset))))


def _lines(broker: str, topic: str, *argv: str) -> list[str]:
    done = tail(broker, topic, *argv)
    assert done.returncode == 0, done.stderr
    assert not CONTROL.search(done.stdout.replace("\n", ""))
    return done.stdout.splitlines()


def test_human_lines_show_buy_probability_items_reasons_and_triggers(broker, scored):
    t, events, out = scored
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  \d+:\d+ +")

    scores = _lines(broker, t["scores"])
    assert len(scores) == len(out["scores"]) and all(stamp.match(x) for x in scores)
    for record in out["scores"]:
        v = json.loads(record.value)
        line = next(x for x in scores if f"  {record.partition}:{record.offset} " in x)
        assert v["session_id"] in line and f"{v['model_name']} v{v['model_version']}" in line
        assert (f"buy {v['buy_probability']:.4f}" if v["outcome"] is None else v["outcome"]) in line
    # Same columns on every line: the session column starts at one place.
    assert len({x.index(json.loads(r.value)["session_id"]) for x, r in zip(
        scores, sorted(out["scores"], key=lambda r: (r.partition, r.offset)))}) == 1

    items = _lines(broker, t["next_items"])
    assert len(items) == len(events)
    for record in out["next_items"][:50]:
        v = json.loads(record.value)
        line = next(x for x in items if f"  {record.partition}:{record.offset} " in x)
        assert "next " + " ".join(v["items"][:5]) + " (+2)" in line and v["session_id"] in line

    dlq = _lines(broker, t["dlq"])
    assert sorted(re.search(r"DEAD (\w+)", x).group(1) for x in dlq) == sorted(r for *_, r in MALFORMED)
    invalid = next(x for x in dlq if "DEAD invalid_json" in x)
    assert invalid.split()[2] == "bad-2"                                       # the key as session
    assert 'original: {"session_id": "bad-2", "event_type":' in invalid        # text shown as text
    undecodable = next(x for x in dlq if "DEAD undecodable" in x)
    assert r"original: b'\xff\xfe\x1b[31m not utf-8'" in undecodable           # bytes escaped

    triggers = _lines(broker, t["triggers"])
    assert len(triggers) == len(out["triggers"]) and all("TRIGGER always_hot  buy " in x for x in triggers)


def test_filters_session_partition_offset_time_and_limit(broker, scored):
    t, events, out = scored
    records = sorted(out["next_items"], key=lambda r: (r.partition, r.offset))
    session = json.loads(records[len(records) // 2].value)["session_id"]
    mine = tail_json(broker, t["next_items"], "--session", session)
    assert sorted(x["value"]["event_id"] for x in mine) == \
        sorted(e["event_id"] for e in events if e["session_id"] == session)

    partition = records[-1].partition
    on_one = tail_json(broker, t["next_items"], "--partition", str(partition))
    assert {(x["partition"], x["offset"]) for x in on_one} == \
        {(r.partition, r.offset) for r in records if r.partition == partition}

    from_offset = tail_json(broker, t["next_items"], "--partition", str(partition), "--offset", "5")
    assert [x["offset"] for x in from_offset] == [x["offset"] for x in on_one if x["offset"] >= 5]

    assert len(tail_json(broker, t["next_items"], "--limit", "3")) == 3
    stamps = sorted(r.timestamp for r in records)
    middle = stamps[len(stamps) // 2]
    later = tail_json(broker, t["next_items"], "--from-time", str(middle))
    assert len(later) == sum(1 for s in stamps if s >= middle) and 0 < len(later) < len(records)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamps[-1] / 1000 + 3600))
    assert tail_json(broker, t["next_items"], "--from-time", iso) == []


def test_follow_from_end_prints_only_new_records(broker):
    topic = f"follow-{uuid.uuid4().hex[:8]}"
    # One big batch last: the embedded broker reports its end as that batch's start + 1,
    # so a naive seek-to-end would reprint most of it.
    produce(broker, topic, [(b"k", b"old %d" % i) for i in range(50)])   # one key: one partition
    before = tail_json(broker, topic)
    assert len(before) == 50
    proc = subprocess.Popen([CLICKSCORE, "tail", "--broker", broker, topic, "--follow", "--from-end",
                             "--json", "--limit", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        n = 0
        while proc.poll() is None and time.monotonic() < deadline:
            produce(broker, topic, [(b"k", b"new %d" % n)])   # until tail has seen three
            n += 1
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = [json.loads(x) for x in stdout.splitlines()]
    assert len(lines) == 3 and all(x["value"].startswith("new ") for x in lines), lines
    assert [x["value"] for x in lines] == sorted((x["value"] for x in lines), key=lambda v: int(v.split()[1]))


def test_missing_topic_and_missing_broker_fail_with_a_clear_message(broker):
    done = tail(broker, f"nope-{uuid.uuid4().hex[:6]}")
    assert done.returncode == 2 and "does not exist" in done.stderr and not done.stdout
    done = tail(f"127.0.0.1:{free_port()}", "buyer-scores")
    assert done.returncode == 2 and "no Kafka broker answers" in done.stderr
    done = tail(broker, "x", "--from-end", "--offset", "3")
    assert done.returncode == 2 and "not allowed with" in done.stderr
