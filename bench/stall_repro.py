"""Reproduction: a Faust 0.15.3 worker that was idle in its group (empty assignment)
and is then given partitions may consume nothing from them. No clickscore code runs.

    .venv/bin/python -m bench.stall_repro                 # prints one JSON line; exit 1 if it stalled
    .venv/bin/python -m bench.stall_repro --partitions 2 --workers 3

On a fresh embedded broker: an input topic with --partitions partitions and
--workers plain Faust workers (one agent that counts each event into a table and
forwards it; fast consumer-group settings as in PLATFORM.md), so that at least one
worker gets no partition. Events are produced; then the workers that own partitions
are stopped (SIGTERM), the idle worker is given their partitions, more events are
produced, and we wait for the forwarded copies. A worker process is this very
module with --worker.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stream.broker import EmbeddedBroker, free_port

RAW = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def worker_main(broker: str, app_id: str, source: str, sink: str, partitions: int, web_port: int,
                data_dir: str) -> None:
    import faust

    app = faust.App(app_id, broker=f"kafka://{broker}", autodiscover=False, web_port=web_port,
                    datadir=data_dir, topic_partitions=partitions, topic_replication_factor=1,
                    broker_session_timeout=6.0, broker_heartbeat_interval=1.0, broker_rebalance_timeout=6.0,
                    consumer_auto_offset_reset="earliest", worker_redirect_stdouts=False,
                    recovery_consistency_check=False)
    source_topic = app.topic(source, **RAW)
    sink_topic = app.topic(sink, **RAW)
    counts = app.Table("counts", partitions=partitions, key_type=bytes, value_type=bytes,
                       schema=faust.Schema(**RAW))

    @app.agent(source_topic)
    async def forward(stream):
        async for event in stream.events():
            counts[event.key] = event.value
            await sink_topic.send(key=event.key, value=event.value)

    faust.Worker(app, loglevel="info", quiet=True, redirect_stdouts=False).execute_from_commandline()


def produce(broker: str, topic: str, start: int, n: int, partitions: int) -> None:
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=5)
    for i in range(start, start + n):
        producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=i % partitions)
    producer.flush()
    producer.close()


def forwarded(broker: str, topic: str, want: int, timeout: float) -> set[int]:
    """Event numbers forwarded to the sink topic so far (waits for `want` of them)."""
    from bench.workerkit import read_topic
    records = read_topic(broker, topic, lambda r: len({x.value for x in r}) >= want, timeout=timeout, settle=0.5)
    return {int(r.value[1:]) for r in records}


def wait_log(path: Path, text: str, timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def owns_source(path: Path, source: str) -> bool:
    """The worker's last assignment holds a partition of the source topic."""
    text = path.read_text(errors="replace")
    last = text.rfind("Setting newly assigned partitions")
    block = text[last:text.find("for group", last)] if last >= 0 else ""
    return source in block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stall_repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--wait-s", type=float, default=60.0)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        broker, app_id, source, sink, partitions, port, data_dir = args.worker
        worker_main(broker, app_id, source, sink, int(partitions), int(port), data_dir)
        return 0

    work = Path(tempfile.mkdtemp(prefix="clickscore-stall-"))
    run = uuid.uuid4().hex[:8]
    source, sink, app_id = f"src-{run}", f"dst-{run}", f"stall-{run}"
    with EmbeddedBroker() as broker:
        from kafka.admin import KafkaAdminClient, NewTopic
        admin = KafkaAdminClient(bootstrap_servers=broker)
        admin.create_topics([NewTopic(source, args.partitions, 1), NewTopic(sink, args.partitions, 1)])
        admin.close()
        procs, logs = [], []
        for i in range(args.workers):
            log = work / f"worker{i}.log"
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.stall_repro", "--worker", broker, app_id, source, sink,
                 str(args.partitions), str(free_port()), str(work / f"data{i}")],
                stdout=open(log, "wb"), stderr=subprocess.STDOUT))
            wait_log(log, "Worker ready")
        time.sleep(8)   # let the last join settle
        produce(broker, source, 0, args.events, args.partitions)
        first = len(forwarded(broker, sink, args.events, 60))
        idle = [i for i, log in enumerate(logs) if not owns_source(log, source)]
        busy = [i for i in range(args.workers) if i not in idle]
        for i in busy:
            procs[i].terminate()
        for i in busy:
            procs[i].wait(timeout=60)
        started = time.monotonic()
        produce(broker, source, args.events, args.events, args.partitions)
        seen = forwarded(broker, sink, 2 * args.events, args.wait_s)
        second = len(seen)
        missing = sorted(set(range(2 * args.events)) - seen)
        # Did a missing event reach the agent (its table write is in the changelog)?
        from bench.workerkit import read_topic
        changelog = read_topic(broker, f"{app_id}-counts-changelog", lambda r: False, timeout=5, settle=0)
        in_changelog = sorted(int(r.key[1:]) for r in changelog if r.key and int(r.key[1:]) in set(missing))
        waited = time.monotonic() - started
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
    stalled = bool(idle) and second < 2 * args.events
    print(json.dumps({"partitions": args.partitions, "workers": args.workers, "idle_workers": idle,
                      "forwarded_before": first, "forwarded_after_takeover": second - first,
                      "expected_after_takeover": args.events, "waited_s": round(waited, 1),
                      "missing_events": missing[:20], "missing_but_in_changelog": in_changelog[:20], "stalled": stalled, "logs": str(work)}))
    return 1 if stalled else 0


if __name__ == "__main__":
    sys.exit(main())
