"""Benchmark: the streaming scorer on the embedded broker, against a Faust pass-through.

    .venv/bin/python -m bench.stream --events 20000
    .venv/bin/python -m bench.stream --events 5000 --model onnx_models/default --batch-size 128

Starts one embedded broker, then on it:
1. a real `clickscore worker` (subprocess). `--events` simulated events are produced
   into its input topic *before* it is measured, so it runs saturated:
   events_per_s = events / (last next-items append - first next-items append).
   The event-loop lag histogram is scraped before and after this phase.
2. the same worker, paced: `--latency-events` more events produced at
   `--latency-rate` events/s; p50_ms/p99_ms = next-items append time - input append
   time, both Kafka (CreateTime) timestamps, matched by event id.
3. a Faust agent that only forwards each event (`await topic.send`) on the same
   pre-produced events: passthrough_events_per_s, the ceiling Faust itself sets.

Prints one JSON line and appends it to bench/results/stream-<date>.json with the
machine (CPU model, cores) and the execution provider. Without --model it uses
onnx_models/default, or builds a small GRU with the real train/export commands.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.record import append_result, machine
from bench.workerkit import CLICKSCORE, WorkerProcess, build_model, produce, read_topic
from stream import lifecycle
from stream.broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parents[1]


def simulated_events(n: int, workdir: Path, seed: int = 21) -> list[tuple[bytes, bytes, str]]:
    """(key, value, event_id) of the first n events, in event-time order."""
    import polars as pl

    sessions = max(100, n // 8)
    while True:
        path = workdir / f"sim-{sessions}.parquet"
        subprocess.run([CLICKSCORE, "simulate", "--sessions", str(sessions), "--seed", str(seed),
                        "--out", str(path)], check=True, capture_output=True)
        frame = pl.read_parquet(path)
        if frame.height >= n:
            break
        sessions *= 2
    frame = frame.sort("timestamp", maintain_order=True).head(n).drop("split")
    out = []
    for i, row in enumerate(frame.iter_rows(named=True)):
        event = {k: v for k, v in row.items() if v is not None}
        event["event_id"] = f"b{seed}-{i}"
        out.append((event["session_id"].encode(), json.dumps(event, separators=(",", ":")).encode(),
                    event["event_id"]))
    return out


def scrape_histogram(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        for suffix in ("sum", "count"):
            if line.startswith(f"{name}_{suffix} "):
                out[suffix] = float(line.split()[1])
    return out


def model_provider(port: int) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r'clickscore_model_info{[^}]*provider="([^"]+)"', text)
    return m.group(1) if m else "unknown"


def histogram_summary(before: dict, after: dict) -> dict:
    count = after.get("count", 0) - before.get("count", 0)
    total = after.get("sum", 0) - before.get("sum", 0)
    bounds = sorted((float(k), after[k] - before.get(k, 0)) for k in after if k not in ("sum", "count")
                    and k != "+Inf")
    p99 = None
    for bound, cumulative in bounds:
        if count and cumulative >= 0.99 * count:
            p99 = bound
            break
    return {"probes": int(count), "mean_ms": round(1000 * total / count, 2) if count else None,
            "p99_bucket_ms": round(1000 * p99, 1) if p99 is not None else f">{1000 * bounds[-1][0]:.0f}"}


def wait_for_ready(worker: WorkerProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Worker ready" in worker.log() or "[^Worker]: Ready" in worker.log():
            return
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError("worker not ready")


def throughput(records) -> float:
    stamps = sorted(r.timestamp for r in records)
    span = (stamps[-1] - stamps[0]) / 1000
    return (len(stamps) - 1) / span if span > 0 else float("nan")


def passthrough_main(broker: str, source: str, sink: str, web_port: int) -> None:
    """A Faust agent that forwards raw events: the floor of Faust's per-event cost."""
    import faust

    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    app = faust.App(f"passthrough-{uuid.uuid4().hex[:8]}", broker=f"kafka://{broker}", autodiscover=False,
                    web_port=web_port, broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
                    broker_rebalance_timeout=6.0, consumer_auto_offset_reset="earliest",
                    worker_redirect_stdouts=False)
    source_topic = app.topic(source, **raw)
    sink_topic = app.topic(sink, **raw)

    @app.agent(source_topic)
    async def forward(stream):
        async for event in stream.events():
            await sink_topic.send(key=event.key, value=event.value)

    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events for the saturated runs")
    parser.add_argument("--latency-events", type=int, default=3000, help="paced events for latency")
    parser.add_argument("--latency-rate", type=float, default=500.0, help="paced events per second")
    parser.add_argument("--model", default="", help="model folder (default: onnx_models/default or a fresh one)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--passthrough-worker", nargs=4, metavar=("BROKER", "SOURCE", "SINK", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.passthrough_worker:
        broker, source, sink, port = args.passthrough_worker
        passthrough_main(broker, source, sink, int(port))
        return 0

    work = Path(tempfile.mkdtemp(prefix="clickscore-bench-"))
    model = Path(args.model) if args.model else REPO / "onnx_models" / "default"
    if not (model / "model.onnx").is_file():
        print(f"no model at {model}: building a small one with clickscore train/export", file=sys.stderr)
        model = build_model(work / "model")
    events = simulated_events(args.events + args.latency_events, work)
    saturated, paced = events[:args.events], events[args.events:]

    with EmbeddedBroker() as broker:
        run = uuid.uuid4().hex[:8]
        topics = {name: f"bench-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
        metrics_port = free_port()
        produce(broker, topics["input"], [(k, v) for k, v, _ in saturated])
        worker = WorkerProcess(broker, model, topics, f"bench-{run}", work / "worker.log", free_port(),
                               ["--metrics-port", str(metrics_port), "--partitions", str(args.partitions),
                                "--batch-size", str(args.batch_size), "--batch-wait-s", str(args.batch_wait_s),
                                "--log-level", "info"])
        with worker:
            time.sleep(1.0)
            lag_before = {}
            while not lag_before:
                try:
                    lag_before = scrape_histogram(metrics_port, "clickscore_event_loop_lag_seconds")
                except OSError:
                    time.sleep(0.2)
            scored = read_topic(broker, topics["next_items"], lambda r: len(r) >= len(saturated),
                                timeout=1800, settle=0)
            lag_after = scrape_histogram(metrics_port, "clickscore_event_loop_lag_seconds")
            provider = model_provider(metrics_port)
            events_per_s = throughput(scored)

            # Paced: latency at a rate the worker keeps up with.
            sent = {}
            from kafka import KafkaProducer
            producer = KafkaProducer(bootstrap_servers=broker, linger_ms=0)
            start = time.perf_counter()
            for i, (key, value, event_id) in enumerate(paced):
                delay = start + i / args.latency_rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent[event_id] = producer.send(topics["input"], key=key, value=value)
            producer.flush()
            input_ms = {eid: fut.get(timeout=30).timestamp for eid, fut in sent.items()}
            producer.close()
            outputs = read_topic(broker, topics["next_items"],
                                 lambda r: len(r) >= len(saturated) + len(paced), timeout=600, settle=0)
            lag_paced = scrape_histogram(metrics_port, "clickscore_event_loop_lag_seconds")
        latencies = np.array([r.timestamp - input_ms[json.loads(r.value)["event_id"]] for r in outputs
                              if json.loads(r.value)["event_id"] in input_ms], dtype=np.float64)

        # Pass-through Faust agent on the same events and broker.
        sink = f"bench-pass-{run}"
        pass_proc = lifecycle.spawn([sys.executable, "-m", "bench.stream", "--passthrough-worker", broker,
                                     topics["input"], sink, str(free_port())], cwd=REPO,
                                    stdout=open(work / "passthrough.log", "wb"), stderr=subprocess.STDOUT)
        try:
            forwarded = read_topic(broker, sink, lambda r: len(r) >= len(events), timeout=1800, settle=0)
        finally:
            lifecycle.stop_child(pass_proc, grace_s=lifecycle.STOP_DEADLINE_S)
        passthrough = throughput(forwarded[:len(saturated)])

    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "events": len(saturated),
        "events_per_s": round(events_per_s, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "latency_events": len(latencies),
        "latency_rate_per_s": args.latency_rate,
        "passthrough_events_per_s": round(passthrough, 1),
        "event_loop_lag_saturated": histogram_summary(lag_before, lag_after),
        "event_loop_lag_paced": histogram_summary(lag_after, lag_paced),
        "batch_size": args.batch_size, "batch_wait_s": args.batch_wait_s, "partitions": args.partitions,
        "model": str(model), "provider": provider, "machine": machine(),
    }
    append_result("stream", result)
    return 0


if __name__ == "__main__":
    # SIGTERM/SIGINT/SIGHUP abandon the run; the `with` blocks stop the worker and the
    # broker on the way out (and they die with this process even if it is SIGKILLed).
    lifecycle.install()
    try:
        with lifecycle.interruptible():
            sys.exit(main())
    except lifecycle.StopRequested:
        sys.exit(lifecycle.EXIT_OK)
