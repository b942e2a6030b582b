"""Benchmark: the streaming scorer on the embedded broker, against a Faust pass-through.

    .venv/bin/python -m bench.stream --events 20000
    .venv/bin/python -m bench.stream --events 20000 --n-items 50000 --no-baselines
    .venv/bin/python -m bench.stream --events 20000 --log yoochoose:../shared/datasets/yoochoose-100k
    .venv/bin/python -m bench.stream --events 20000 --no-step --worker-processes 2
    .venv/bin/python -m bench.stream --events 5000 --model onnx_models/default --batch-size 128 --profile 10
    # A/B of latency settings at a fixed rate, kept apart from the stream figures:
    .venv/bin/python -m bench.stream --events 600 --latency-rate 200 --no-baselines --no-step \
        --record-as latency --fetch-max-wait-ms 100 --batch-linger-s 0.01

Starts one embedded broker, then on it:
1. a real `clickscore worker` (subprocess). `--events` simulated events (or the first
   events of a real log: `--log yoochoose:../shared/datasets/yoochoose-100k`) are produced
   into its input topic *before* it is measured, so it runs saturated:
   events_per_s = events / (last next-items append - first next-items append).
   The event-loop lag histogram is scraped before and after this phase.
2. the same worker, paced: `--latency-events` more events produced at
   `--latency-rate` events/s; p50_ms/p99_ms = next-items append time - input append
   time, both Kafka (CreateTime) timestamps, matched by event id.
3. a Faust agent that only forwards each event (`await topic.send`) on the same
   pre-produced events: passthrough_events_per_s, the ceiling Faust itself sets;
   and a Faust agent that only consumes them: consume_only_events_per_s (first to
   last event seen by the agent, its own clock). --no-baselines skips both.
4. the worker's Kafka I/O alone (bench/io_floor.py): a Faust agent that takes events as
   the worker does and sends the records the worker would send for them (next-items and
   buyer-scores of the sizes the worker sent, one changelog record per session and batch
   of its state size), and nothing else: io_floor_events_per_s bounds the worker's rate,
   so io_floor_vs_passthrough and io_floor_vs_consume_only bound the worker's ratios.
   Skipped with the other baselines.

Also recorded: the model-state cache's counters after the saturated run (hits,
misses, too_long, bytes per session: clickscore_model_cache_*), and the model's cost
per event, window graph vs step graph, at batch 1/16/256 (bench/step.py measure on
the served folder, one thread). --latency-rate 0 (the default) paces at half the
measured saturated rate. Where the time goes: the worker's clickscore_stage_seconds
means, per stage, for the saturated and the paced phase (stages_*_ms: consume and
batch_fill per event, the rest per micro-batch; see docs/operations.md), and the worker's
CPU per event in the saturated phase (cpu_saturated: whole process and event-loop thread,
from /proc, between 10% and 90% of the events; steadier than events/s on a shared machine;
machine_busy_cores and machine_us_per_event: every core's busy time, broker and benchmark
included, so a run shows whether the machine or the worker was the bound).
--worker-processes N runs `clickscore worker --processes N`: the same figures, summed over
the N processes (their metrics ports and CPU), py-spy on the first. --profile S
adds a second paced phase of --latency-events events, sampled by py-spy for S seconds,
and records the functions that hold the most samples (own time) and that phase's own
p50/p99 and stages (profiled_paced); p50_ms/p99_ms always come from the unsampled phase.

The model: --model, else onnx_models/default when it has a step graph, else an
untrained GRU of the default model's shapes (GRUConfig: embedding 64, hidden 96) and
--n-items item indices (default 1,988, the default model's catalogue), exported with
both graphs by bench/step.py build_folder: cost depends on shapes, not weights (every
simulated item is then out of vocabulary, which costs the same). The machine is
usually shared: load_avg_1m is recorded with every figure, and figures taken at a
load above the core count say little.

Prints one JSON line and appends it to bench/results/stream-<date>.json with the
machine (CPU model, cores) and the execution provider. Without --model it uses
onnx_models/default, or builds a small GRU with the real train/export commands.
"""
from __future__ import annotations

import argparse
import json
import re
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.record import append_result, machine
from bench.workerkit import CLICKSCORE, WorkerProcess, build_model, child_pids, proc_stat, produce, read_topic
from stream import lifecycle
from stream.broker import EmbeddedBroker, free_port
from stream.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def simulated_events(n: int, workdir: Path, seed: int = 21) -> list[tuple[bytes, bytes, str]]:
    """(key, value, event_id) of the first n events of a simulated log, in event-time order."""
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
    return as_events(frame, n, f"b{seed}")


def log_events(n: int, workdir: Path, log: str) -> list[tuple[bytes, bytes, str]]:
    """The first n events (event-time order) of a real log, `DATASET:PATH` as `clickscore
    prepare --dataset DATASET --input PATH` reads it (e.g. yoochoose:../shared/datasets/yoochoose-100k).
    Every split is used: the benchmark only needs the events."""
    import polars as pl

    dataset, sep, path = log.partition(":")
    if not sep or not dataset or not path:
        raise SystemExit(f"--log {log!r}: give DATASET:PATH, e.g. yoochoose:../shared/datasets/yoochoose-100k")
    out = workdir / "log"
    done = subprocess.run([CLICKSCORE, "prepare", "--dataset", dataset, "--input", path, "--out", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--log {log!r}: clickscore prepare failed:\n{done.stderr[-2000:]}")
    frame = pl.read_parquet(out / "events.parquet")
    if frame.height < n:
        raise SystemExit(f"--log {log!r} holds {frame.height:,} events; this run needs {n:,} "
                         "(lower --events/--latency-events)")
    return as_events(frame, n, "l")


def as_events(frame, n: int, prefix: str) -> list[tuple[bytes, bytes, str]]:
    """(key, value, event_id) of a canonical frame's first n events in event-time order."""
    frame = frame.sort("timestamp", maintain_order=True).head(n)
    if "split" in frame.columns:
        frame = frame.drop("split")
    out = []
    for i, row in enumerate(frame.iter_rows(named=True)):
        event = {k: v for k, v in row.items() if v is not None}
        event["event_id"] = f"{prefix}-{i}"
        out.append((event["session_id"].encode(), json.dumps(event, separators=(",", ":")).encode(),
                    event["event_id"]))
    return out


def past_window_share(events: list[tuple[bytes, bytes, str]], window: int = 100) -> float:
    """Share of events at a position past `window` in their session (counted from the first
    event of a session id in `events`): the events the worker scores by the window graph,
    because a GRU's state cannot step exactly past the window's edge."""
    seen: dict[bytes, int] = {}
    past = 0
    for key, _, _ in events:
        seen[key] = seen.get(key, 0) + 1
        past += seen[key] > window
    return past / max(1, len(events))


def metrics_text(port: int | list[int]) -> str:
    """The /metrics page of one worker process, or of each (`--worker-processes N`: ports
    METRICS_PORT..+N-1) one after another: counters, sums and histogram buckets of the
    same series then add up across them in the parsers below."""
    ports = port if isinstance(port, list) else [port]
    return "\n".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode()
                     for p in ports)


def scrape_histogram(port: int | list[int], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text(port).splitlines():
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        for suffix in ("sum", "count"):
            if line.startswith(f"{name}_{suffix} "):
                out[suffix] = out.get(suffix, 0.0) + float(line.split()[1])
    return out


def scrape_stages(port: int | list[int]) -> dict[str, tuple[float, float]]:
    """clickscore_stage_seconds: stage -> (sum, count)."""
    out: dict[str, list[float]] = {}
    for line in metrics_text(port).splitlines():
        m = re.match(r'clickscore_stage_seconds_(sum|count){stage="([^"]+)"} (\S+)', line)
        if m:
            out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] += float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_summary(before: dict, after: dict) -> dict[str, dict]:
    """Mean milliseconds per stage between two scrapes (consume and batch_fill: per event;
    the rest: per micro-batch) and how many observations."""
    out = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        n = count - c0
        out[stage] = {"mean_ms": round(1000 * (total - t0) / n, 2) if n else None, "n": int(n)}
    return out


def model_provider(port: int | list[int]) -> str:
    m = re.search(r'clickscore_model_info{[^}]*provider="([^"]+)"', metrics_text(port))
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


def baseline_app(prefix: str, broker: str, web_port: int):
    """A plain Faust app (raw bytes, the worker's fast group timeouts) for the baseline agents."""
    import faust

    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    app = faust.App(f"{prefix}-{uuid.uuid4().hex[:8]}", broker=f"kafka://{broker}", autodiscover=False,
                    web_port=web_port, broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
                    broker_rebalance_timeout=6.0, consumer_auto_offset_reset="earliest",
                    worker_redirect_stdouts=False)
    return app, raw


def passthrough_main(broker: str, source: str, sink: str, web_port: int) -> None:
    """A Faust agent that forwards raw events: the floor of Faust's per-event cost."""
    import faust

    app, raw = baseline_app("passthrough", broker, web_port)
    source_topic = app.topic(source, **raw)
    sink_topic = app.topic(sink, **raw)

    @app.agent(source_topic)
    async def forward(stream):
        async for event in stream.events():
            await sink_topic.send(key=event.key, value=event.value)

    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


def consume_main(broker: str, source: str, n: int, out_path: str, web_port: int) -> None:
    """A Faust agent that only consumes: the most Faust reads on this machine. Writes
    {"events", "seconds"} (first to n-th event, the agent's clock) to out_path."""
    import faust

    app, raw = baseline_app("consume", broker, web_port)
    source_topic = app.topic(source, **raw)
    seen = {"count": 0, "first": 0.0}

    @app.agent(source_topic)
    async def consume(stream):
        async for _ in stream.events():
            seen["count"] += 1
            if seen["count"] == 1:
                seen["first"] = time.perf_counter()
            if seen["count"] == n:
                Path(out_path).write_text(json.dumps({"events": n, "seconds": time.perf_counter() - seen["first"]}))

    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


def consume_only(broker: str, topic: str, n: int, work: Path) -> float:
    out = work / f"consume-{uuid.uuid4().hex[:6]}.json"
    proc = lifecycle.spawn([sys.executable, "-m", "bench.stream", "--consume-worker", broker, topic, str(n),
                            str(out), str(free_port())], cwd=REPO,
                           stdout=open(work / "consume.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.2)
        figures = json.loads(out.read_text()) if out.exists() else None
    finally:
        lifecycle.stop_child(proc, grace_s=lifecycle.STOP_DEADLINE_S)
    if figures is None:
        raise RuntimeError(f"the consume-only agent did not read {n} events:\n"
                           + (work / "consume.log").read_text()[-3000:])
    return (figures["events"] - 1) / figures["seconds"]


def scrape_cache(port: int | list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text(port).splitlines():
        if line.startswith("clickscore_model_cache_") and "_created" not in line:
            name, value = line.split()[:2]
            name = name.removeprefix("clickscore_model_cache_").removesuffix("_total")
            out[name] = out.get(name, 0.0) + float(value)
    if out.get("sessions"):
        out["bytes_per_session"] = round(out["bytes"] / out["sessions"], 1)
    return out


def cpu_seconds(pid: int | list[int]) -> dict[str, float] | None:
    """CPU seconds (user + system) of the whole process, of its main thread (the event
    loop: Faust runs it on the thread whose id is the pid) and of its child processes
    (the inference process), from /proc (Linux); summed over the worker processes when
    given several pids."""
    def cpu(stat_of: str) -> float:
        fields = proc_stat(stat_of)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    pids = pid if isinstance(pid, list) else [pid]
    try:
        # children: the inference process of --inference-process true
        return {"process": sum(cpu(str(p)) for p in pids), "event_loop": sum(cpu(f"{p}/task/{p}") for p in pids),
                "children": sum(cpu(str(child)) for p in pids for child in child_pids(p))}
    except (OSError, ValueError, IndexError):
        return None


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy (not idle, not waiting on I/O) since
    boot, from /proc/stat (Linux): the broker, the benchmark and everything else included."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def events_consumed(port: int | list[int]) -> float:
    return sum(float(line.split()[-1]) for line in metrics_text(port).splitlines()
               if line.startswith("clickscore_events_consumed_total{"))


class CpuPerEvent(threading.Thread):
    """The worker's CPU per consumed event between 10% and 90% of `total` events (start-up
    and the tail left out): a figure that, unlike events/s, hardly moves when other jobs
    share the cores, so A/B runs on a busy machine still compare."""

    def __init__(self, pid: int, port: int | list[int], total: int, every_s: float = 0.25, processes: int = 1):
        super().__init__(daemon=True)
        self.pid, self.port, self.total, self.every_s = pid, port, total, every_s
        self.processes = processes      # > 1: `pid` is `worker --processes N`'s parent; meter its N children
        self.marks: list[tuple[float, float, dict]] = []   # (perf_counter, events, cpu)
        self.stopping = threading.Event()

    def pids(self) -> list[int] | None:
        if self.processes == 1:
            return [self.pid]
        children = child_pids(self.pid)
        return children if len(children) == self.processes else None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                pids = self.pids()
                done, cpu = events_consumed(self.port), (cpu_seconds(pids) if pids else None)
                if cpu is not None:
                    cpu["machine"] = machine_busy_s()
            except OSError:
                done, cpu = None, None
            if done is not None and cpu is not None:
                self.marks.append((time.perf_counter(), done, cpu))
                if done >= self.total:
                    return
            self.stopping.wait(self.every_s)

    def result(self) -> dict | None:
        self.stopping.set()
        self.join(timeout=5)
        inside = [m for m in self.marks if 0.1 * self.total <= m[1] <= 0.9 * self.total]
        if len(inside) < 2 or inside[-1][1] <= inside[0][1]:
            return None
        (t0, e0, c0), (t1, e1, c1) = inside[0], inside[-1]
        n = e1 - e0
        return {"events": int(n), "events_per_s": round(n / (t1 - t0), 1),
                "worker_us_per_event": round(1e6 * (c1["process"] - c0["process"]) / n, 1),
                "event_loop_us_per_event": round(1e6 * (c1["event_loop"] - c0["event_loop"]) / n, 1),
                "other_threads_us_per_event": round(1e6 * ((c1["process"] - c0["process"])
                                                           - (c1["event_loop"] - c0["event_loop"])) / n, 1),
                "event_loop_core_share": round((c1["event_loop"] - c0["event_loop"]) / (t1 - t0), 2),
                "child_processes_us_per_event": round(1e6 * (c1["children"] - c0["children"]) / n, 1),
                # the whole machine (broker, benchmark, worker): cores busy out of machine()["cores"]
                "machine_us_per_event": round(1e6 * (c1["machine"] - c0["machine"]) / n, 1),
                "machine_busy_cores": round((c1["machine"] - c0["machine"]) / (t1 - t0), 2)}


def paced_phase(broker: str, topics: dict, events: list, rate: float, done_before: int,
                metrics_port: int | list[int]) -> tuple[np.ndarray, dict]:
    """Produce `events` at `rate` per second; their event-to-output latencies (ms, Kafka
    CreateTime of the next-items output minus that of the input) and the worker's stage
    histograms once all of them are scored (done_before: next-items outputs already there)."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=0)
    sent = {}
    start = time.perf_counter()
    for i, (key, value, event_id) in enumerate(events):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[event_id] = producer.send(topics["input"], key=key, value=value)
    producer.flush()
    input_ms = {eid: fut.get(timeout=30).timestamp for eid, fut in sent.items()}
    producer.close()
    outputs = read_topic(broker, topics["next_items"], lambda r: len(r) >= done_before + len(events),
                         timeout=600, settle=0)
    stages = scrape_stages(metrics_port)
    latencies = []
    for r in outputs:
        event_id = json.loads(r.value)["event_id"]
        if event_id in input_ms:
            latencies.append(r.timestamp - input_ms[event_id])
    return np.array(latencies, dtype=np.float64), stages


def profile_worker(pid: int, seconds: float, work: Path) -> dict:
    """py-spy samples of the worker (all threads); the functions with the most own-time samples."""
    spy = next((p for p in (Path(sys.executable).parent / "py-spy",) if p.exists()), None)
    if spy is None:
        return {"error": "py-spy not found (pip install py-spy)"}
    raw = work / "profile.txt"
    done = subprocess.run([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format",
                           "raw", "--output", str(raw), "--threads", "--nonblocking"], capture_output=True, text=True)
    if done.returncode != 0 or not raw.exists():
        return {"error": (done.stderr or done.stdout)[-500:]}
    own: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        threads[frames[0]] = threads.get(frames[0], 0) + int(count)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    return {"samples": total, "file": str(raw),
            "threads": {k: round(v / total, 3) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])[:6]},
            "top_own": [[name, round(count / total, 3)] for name, count in top]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events for the saturated runs")
    parser.add_argument("--latency-events", type=int, default=3000, help="paced events for latency")
    parser.add_argument("--latency-rate", type=float, default=0.0,
                        help="paced events per second (0: half the measured saturated rate)")
    parser.add_argument("--model", default="", help="model folder (default: onnx_models/default or a fresh one)")
    parser.add_argument("--n-items", type=int, default=0,
                        help="serve an untrained GRU of the default shapes with this many item indices")
    parser.add_argument("--model-cache-bytes", type=int, default=256 << 20, help="worker --model-cache-bytes")
    parser.add_argument("--producer-linger-ms", type=int, default=-1,
                        help="worker --producer-linger-ms (-1: the worker's default)")
    parser.add_argument("--fetch-max-wait-ms", type=int, default=0,
                        help="worker --fetch-max-wait-ms (0: the worker's default)")
    parser.add_argument("--inference-threads", type=int, default=1, help="worker --inference-threads")
    parser.add_argument("--worker-processes", type=int, default=1,
                        help="worker --processes: N worker processes in one group (metrics summed over them)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the Faust consume-only/pass-through runs")
    parser.add_argument("--step-repeats", type=int, default=20, help="timed runs per window/step figure")
    parser.add_argument("--no-step", action="store_true", help="skip the window-vs-step model cost")
    parser.add_argument("--log", default="",
                        help="events from a real log, DATASET:PATH as clickscore prepare reads it "
                             "(e.g. yoochoose:../shared/datasets/yoochoose-100k), instead of simulated ones")
    parser.add_argument("--record-as", default="stream",
                        help="results file bench/results/NAME-<date>.json (latency: A/B runs on a loaded machine)")
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the worker for S s of the paced phase")
    parser.add_argument("--consume-worker", nargs=5, metavar=("BROKER", "SOURCE", "N", "OUT", "PORT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    parser.add_argument("--batch-linger-s", type=float, default=0.01, help="worker --batch-linger-s")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--inference-process", default="false", choices=("true", "false"),
                        help="worker --inference-process (score in a child process with its own GIL)")
    parser.add_argument("--batch-sends", default="true", choices=("true", "false"),
                        help="worker --batch-sends (one producer batch per topic-partition, or one send per output)")
    parser.add_argument("--passthrough-worker", nargs=4, metavar=("BROKER", "SOURCE", "SINK", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.passthrough_worker:
        broker, source, sink, port = args.passthrough_worker
        passthrough_main(broker, source, sink, int(port))
        return 0
    if args.consume_worker:
        broker, source, n, out, port = args.consume_worker
        consume_main(broker, source, int(n), out, int(port))
        return 0

    work = Path(tempfile.mkdtemp(prefix="clickscore-bench-"))
    model = Path(args.model) if args.model else REPO / "onnx_models" / "default"
    model_note = str(model)
    if args.n_items or (not args.model and not (model / "model_step.onnx").is_file()):
        # Shapes of the default model, with both graphs (onnx_models/default predates the step graph).
        from bench.step import build_folder
        n_items = args.n_items or 1988
        model = work / f"gru-{n_items}"
        build_folder("gru", n_items, model)
        model_note = f"untrained GRU, default shapes, {n_items} item indices (bench/step.py build_folder)"
    elif not (model / "model.onnx").is_file():
        print(f"no model at {model}: building a small one with clickscore train/export", file=sys.stderr)
        model = build_model(work / "model")
        model_note = str(model)
    profiled_n = args.latency_events if args.profile else 0
    wanted = args.events + args.latency_events + profiled_n
    events = log_events(wanted, work, args.log) if args.log else simulated_events(wanted, work)
    saturated = events[:args.events]
    paced = events[args.events:args.events + args.latency_events]
    profiled_events = events[args.events + args.latency_events:]

    with EmbeddedBroker() as broker:
        run = uuid.uuid4().hex[:8]
        topics = {name: f"bench-{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
        metrics_port = free_port()
        # --worker-processes N: process i serves metrics on metrics_port + i (stream/processes.py)
        ports = [metrics_port + i for i in range(args.worker_processes)]
        produce(broker, topics["input"], [(k, v) for k, v, _ in saturated])
        worker = WorkerProcess(broker, model, topics, f"bench-{run}", work / "worker.log", free_port(),
                               ["--metrics-port", str(metrics_port), "--partitions", str(args.partitions),
                                "--batch-size", str(args.batch_size), "--batch-wait-s", str(args.batch_wait_s),
                                "--batch-linger-s", str(args.batch_linger_s),
                                "--batch-sends", args.batch_sends, "--inference-process", args.inference_process,
                                "--model-cache-bytes", str(args.model_cache_bytes), "--log-level", "info",
                                "--inference-threads", str(args.inference_threads),
                                "--processes", str(args.worker_processes),
                                *(["--fetch-max-wait-ms", str(args.fetch_max_wait_ms)] if args.fetch_max_wait_ms else []),
                                *(["--producer-linger-ms", str(args.producer_linger_ms)]
                                  if args.producer_linger_ms >= 0 else [])])
        with worker:
            cpu_meter = CpuPerEvent(worker.proc.pid, ports, len(saturated), processes=args.worker_processes)
            cpu_meter.start()
            time.sleep(1.0)
            lag_before = {}
            while not lag_before:
                try:
                    lag_before = scrape_histogram(ports, "clickscore_event_loop_lag_seconds")
                except OSError:
                    time.sleep(0.2)
            def all_scored(records) -> bool:
                if worker.proc.poll() is not None:   # a dead worker would leave this waiting 30 min
                    raise RuntimeError(f"the worker exited ({worker.proc.returncode}):\n{worker.log()[-3000:]}")
                return len(records) >= len(saturated)
            scored = read_topic(broker, topics["next_items"], all_scored, timeout=1800, settle=0)
            cpu_saturated = cpu_meter.result()
            lag_after = scrape_histogram(ports, "clickscore_event_loop_lag_seconds")
            stages_after = scrape_stages(ports)
            provider = model_provider(ports)
            events_per_s = throughput(scored)
            cache = scrape_cache(ports)
            load_saturated = round(__import__("os").getloadavg()[0], 2)
            latency_rate = args.latency_rate or max(10.0, events_per_s / 2)

            # Paced: latency at a rate the worker keeps up with, with nothing else attached
            # to the worker: py-spy at 200 Hz takes part of a core. (Two runs on 2026-12-04,
            # unsampled against sampled p50/p99: 167/322 against 304/560 ms, then 282/598
            # against 148/303: this close to capacity the phases differ as much as that.)
            done_before = len(saturated)
            latencies, stages_paced = paced_phase(broker, topics, paced, latency_rate, done_before, ports)
            lag_paced = scrape_histogram(ports, "clickscore_event_loop_lag_seconds")
            done_before += len(paced)
            profile, profiled = {}, None
            if args.profile:
                # A second paced phase of the same length, sampled by py-spy: where the time
                # goes, and what the sampling itself costs the latency.
                # (several processes: the first of them)
                spied = worker.proc.pid if args.worker_processes == 1 else min(child_pids(worker.proc.pid))
                spy = threading.Thread(target=lambda: profile.update(
                    profile_worker(spied, args.profile, work)))
                spy.start()
                time.sleep(1.0)      # py-spy attaches and reads the symbols first
                profiled_latencies, profiled_stages = paced_phase(broker, topics, profiled_events, latency_rate,
                                                                  done_before, ports)
                spy.join()
                profiled = {"p50_ms": round(float(np.percentile(profiled_latencies, 50)), 1),
                            "p99_ms": round(float(np.percentile(profiled_latencies, 99)), 1),
                            "stages_ms": stage_summary(stages_paced, profiled_stages)}

        passthrough = consumed = io_floor = io_sizes = None
        if not args.no_baselines:
            # Pass-through Faust agent on the same events and broker.
            sink = f"bench-pass-{run}"
            pass_proc = lifecycle.spawn([sys.executable, "-m", "bench.stream", "--passthrough-worker", broker,
                                         topics["input"], sink, str(free_port())], cwd=REPO,
                                        stdout=open(work / "passthrough.log", "wb"), stderr=subprocess.STDOUT)
            try:
                forwarded = read_topic(broker, sink, lambda r: len(r) >= len(events), timeout=1800, settle=0)
            finally:
                lifecycle.stop_child(pass_proc, grace_s=lifecycle.STOP_DEADLINE_S)
            passthrough = round(throughput(forwarded[:len(saturated)]), 1)
            consumed = round(consume_only(broker, topics["input"], len(saturated), work), 1)
            # The worker's I/O alone (bench/io_floor.py), with the sizes of the records it sent.
            sample = read_topic(broker, topics["scores"], lambda r: len(r) >= 1000, timeout=60, settle=0)
            io_sizes = {"scores_bytes": round(float(np.mean([len(r.value) for r in sample]))),
                        "next_items_bytes": round(float(np.mean([len(r.value) for r in scored])))}
            floor_sink = f"bench-floor-{run}"
            floor_proc = lifecycle.spawn([sys.executable, "-m", "bench.io_floor", broker, topics["input"],
                                          floor_sink, str(io_sizes["scores_bytes"]),
                                          str(io_sizes["next_items_bytes"]), str(free_port()), str(len(events)),
                                          str(work / "io_floor.json")], cwd=REPO,
                                         stdout=open(work / "io_floor.log", "wb"), stderr=subprocess.STDOUT)
            try:
                floored = read_topic(broker, f"{floor_sink}-next-items", lambda r: len(r) >= len(events),
                                     timeout=1800, settle=0)
            finally:
                lifecycle.stop_child(floor_proc, grace_s=lifecycle.STOP_DEADLINE_S)
            io_floor = round(throughput(floored[:len(saturated)]), 1)
            if (work / "io_floor.json").is_file():
                meter = json.loads((work / "io_floor.json").read_text())
                io_sizes["us_per_event"] = round(meter["cpu_s"] / meter["events"] * 1e6, 1)
    # Model cost per event, window vs step, on the served folder (one thread, as the worker's
    # inference thread runs it here).
    from bench.step import measure
    step_costs = None if args.no_step else measure(model, [1, 16, 256], 1, args.step_repeats, 20)

    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "events": len(saturated),
        "log": args.log or "simulated (clickscore simulate, seed 21)",
        "past_window_share": round(past_window_share(saturated), 4),
        "events_per_s": round(events_per_s, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "latency_events": len(latencies),
        "latency_rate_per_s": round(latency_rate, 1),
        "passthrough_events_per_s": passthrough,
        "consume_only_events_per_s": consumed,
        "worker_vs_passthrough": round(events_per_s / passthrough, 2) if passthrough else None,
        "worker_vs_consume_only": round(events_per_s / consumed, 2) if consumed else None,
        # bench/io_floor.py: the worker's own Kafka I/O, nothing else; bounds the worker's rate
        "io_floor_events_per_s": io_floor,
        "io_floor_sizes": io_sizes,     # and its CPU per event (us_per_event, all threads)
        "io_floor_vs_passthrough": round(io_floor / passthrough, 2) if io_floor and passthrough else None,
        "io_floor_vs_consume_only": round(io_floor / consumed, 2) if io_floor and consumed else None,
        "worker_vs_io_floor": round(events_per_s / io_floor, 2) if io_floor else None,
        "cpu_saturated": cpu_saturated,
        "model_cache": cache,
        "model_cost_per_event": step_costs,
        "load_avg_1m_saturated": load_saturated,
        "profile": profile or None,
        "event_loop_lag_saturated": histogram_summary(lag_before, lag_after),
        "event_loop_lag_paced": histogram_summary(lag_after, lag_paced),
        "stages_saturated_ms": stage_summary({}, stages_after),
        "stages_paced_ms": stage_summary(stages_after, stages_paced),
        "profiled_paced": profiled,
        "batch_size": args.batch_size, "batch_wait_s": args.batch_wait_s, "batch_linger_s": args.batch_linger_s,
        "partitions": args.partitions, "batch_sends": args.batch_sends == "true",
        "inference_process": args.inference_process == "true",
        "fetch_max_wait_ms": args.fetch_max_wait_ms or None,
        "producer_linger_ms": args.producer_linger_ms if args.producer_linger_ms >= 0 else Settings().producer_linger_ms,
        "inference_threads": args.inference_threads,
        "worker_processes": args.worker_processes,
        "model": model_note, "model_cache_bytes": args.model_cache_bytes, "provider": provider,
        "machine": machine(),
    }
    append_result(args.record_as, result)
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
