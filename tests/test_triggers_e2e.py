"""Marketing triggers end to end on the real embedded broker: `clickscore replay` of a
simulated log -> `clickscore worker --rules deploy/rules.toml` (the shipped model) ->
the triggers topic -> `clickscore sink webhook` -> a real HTTP server that answers
500 to the first two attempts of every trigger of a third of the sessions. Every
trigger on the topic must reach the server (by trigger_id), the failing ones on
their third attempt, nothing dead-lettered.

tests/test_worker.py checks which triggers the worker fires (against the rule engine
run offline); tests/test_sink.py checks the sink's retries, dead letters and commits
on hand-made triggers. This test checks that the pieces fit: the triggers the worker
writes are what the sink reads and delivers."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import polars as pl

from conftest import REPO, free_port, fresh_topic

sys.path.insert(0, str(REPO))   # bench/ is not an installed package
from bench.stream import wait_for_ready  # noqa: E402
from bench.workerkit import CLICKSCORE, WorkerProcess, read_topic, values  # noqa: E402
from test_sink import Webhook, read_all, start_sink, wait_until  # noqa: E402

DEFAULT_MODEL = REPO / "onnx_models" / "default"
RULES = REPO / "deploy" / "rules.toml"
FAILURES = 2   # HTTP 500s before a failing session's trigger is accepted


def test_replayed_log_fires_triggers_that_the_sink_delivers_through_retries(broker, tmp_path):
    run = uuid.uuid4().hex[:8]
    topics = {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    dlq = fresh_topic("triggers-dlq")
    sim = tmp_path / "sim.parquet"
    subprocess.run([CLICKSCORE, "simulate", "--sessions", "400", "--seed", "1", "--buy-share", "0.2",
                    "--out", str(sim)], check=True, capture_output=True)
    log = pl.read_parquet(sim)
    sessions = log["session_id"].unique().sort().to_list()
    failing = set(sessions[::3])
    webhook = Webhook(fail_first={s: FAILURES for s in failing})
    worker = WorkerProcess(broker, DEFAULT_MODEL, topics, f"e2e-{run}", tmp_path / "worker.log", free_port(),
                           ["--rules", str(RULES)])
    sink = None
    started = time.monotonic()
    try:
        worker.start()
        wait_for_ready(worker, timeout=90)
        sink = start_sink(broker, webhook.url, topics["triggers"], dlq, fresh_topic("sink"), free_port(),
                          "--max-attempts", "5", "--initial-backoff-s", "0.1", "--max-backoff-s", "0.5")
        replay = subprocess.run(
            [CLICKSCORE, "replay", "--input", str(sim), "--topic", topics["input"], "--broker", broker,
             "--progress", "false", "--json"], capture_output=True, text=True, timeout=120)
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["sent"] == log.height

        # The worker has scored the whole log: every trigger it fires is on the topic.
        read_topic(broker, topics["next_items"], lambda r: len(r) >= log.height, timeout=120, settle=0)
        triggers = values(read_topic(broker, topics["triggers"], lambda r: True, timeout=10, settle=1.5))
        ids = {t["trigger_id"] for t in triggers}
        wait_until(lambda: ids <= set(webhook.delivered), 60, sink)
        time.sleep(1)   # anything delivered twice would show now
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert sink.poll() is None
    finally:
        output = ""
        if sink is not None:
            sink.terminate()
            try:
                output = sink.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                sink.kill()
                output = sink.communicate()[0]
        worker.stop()
        webhook.close()
    elapsed = time.monotonic() - started

    # The replayed log fired triggers of both rules, for failing and healthy sessions alike.
    assert len(ids) == len(triggers), "a trigger was written twice"
    assert {t["rule"] for t in triggers} == {"high_intent", "abandonment_risk"}
    assert all(t["session_id"] in sessions for t in triggers)
    late = [t["trigger_id"] for t in triggers if t["session_id"] in failing]
    first_time = [t["trigger_id"] for t in triggers if t["session_id"] not in failing]
    assert late and first_time
    # Every trigger delivered exactly once, with its id as the idempotency key; the
    # failing ones on attempt FAILURES + 1, the others on the first.
    assert set(webhook.delivered) == ids
    assert all(webhook.delivered[i] == 1 for i in ids), webhook.delivered
    for trigger_id in late:
        assert webhook.attempts[trigger_id] == FAILURES + 1
        assert webhook.headers[trigger_id]["X-Clickscore-Attempt"] == str(FAILURES + 1)
    for trigger_id in first_time:
        assert webhook.attempts[trigger_id] == 1
    assert all(webhook.headers[i]["Idempotency-Key"] == i for i in ids)
    assert read_all(broker, dlq) == []
    assert output.count("retrying") == FAILURES * len(late), output[-3000:]
    print(f"\n{log.height} events replayed, {len(ids)} triggers delivered ({len(late)} after "
          f"{FAILURES} failures) in {elapsed:.1f} s (worker start included)")
