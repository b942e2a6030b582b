"""`clickscore demo`: the whole pipeline on one laptop, with a live terminal view.

    clickscore demo                                  # simulated log, 60 s
    clickscore demo --duration 30 --rate 300
    clickscore demo --input data/yoochoose --dataset prepared

What it starts, in order, and stops again on exit (SIGINT/Ctrl-C, SIGTERM and SIGHUP
included, within the deadline of stream/lifecycle.py; the children die with the demo
even when it is SIGKILLed):
1. the embedded broker (Tansu) on a free loopback port;
2. a worker, `clickscore worker` as a child process with the model (--model), its own
   app id, web and metrics ports, and fast consumer-group timing;
3. a click log: unless --input is given, the test-split sessions of the simulation the
   default model was trained on (`clickscore simulate --sessions 20000 --items 2000
   --seed 0`, generated in a temp dir; the model never trained on them).

Once a warm-up event has made the round trip through the worker (so the model is
loaded and the consumer group has joined), the log is replayed (stream.replay, in
event-time order, original timestamps, capped at --rate) for --duration seconds
while a reader thread follows the score, next-item and dead-letter topics. The view
redraws about once a second: events/s in and out, end-to-end latency (send ->
output received, p50/p99), dead-lettered count, the sessions with the highest buy
probability now, and the next-item suggestions for the top one.

The summary scores the emitted outputs against the replayed log itself: buy AUC of
each session's latest buy probability against whether the session buys anywhere in
the log, and Recall@20 of each next-item list against the item the session actually
clicked next. Exit status: 0, or 1 when no scores arrived, 2 when a part failed to
start (the message says which).
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream import lifecycle
from stream.errors import ClickscoreError
from stream.settings import Settings, settings_from_args

WARMUP_SESSION = "demo-warmup"
WARMUP_TIMEOUT_S = 60.0
DRAIN_S = 5.0                 # after the replay stops, wait this long for the last outputs
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- metrics

def auc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties averaged); None without both classes."""
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1      # average 1-based rank of the tie group
        i = j + 1
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- live state

@dataclass
class Outputs:
    """What the reader thread has seen on the output topics (guarded by `lock`)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    scores: int = 0
    next_item_lists: int = 0
    dead_lettered: int = 0
    latest_buy: dict[str, float] = field(default_factory=dict)       # session -> probability, not bought yet
    last_buy_before_outcome: dict[str, float] = field(default_factory=dict)   # what AUC judges
    bought: set[str] = field(default_factory=set)
    latest_items: dict[str, list[str]] = field(default_factory=dict)
    next_item_records: list[tuple[str, str, list[str]]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    out_times: deque = field(default_factory=lambda: deque(maxlen=200_000))
    warmed_up: bool = False


class OutputReader(threading.Thread):
    """Follows scores, next items and dead letters with kafka-python's assign() consumer
    (its group consumer gets no assignment on Tansu)."""

    def __init__(self, settings: Settings, outputs: Outputs, sent_at: dict[str, float]):
        super().__init__(name="demo-output-reader", daemon=True)
        self.settings = settings
        self.outputs = outputs
        self.sent_at = sent_at
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:   # reported by the main thread, never lost
            self.error = exc

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition
        s = self.settings
        # fetch_max_wait_ms: the embedded broker holds every fetch for the whole wait even
        # when records are there (PLATFORM.md), and kafka-python's default is 500 ms, so
        # the reader itself added up to half a second to every latency the view showed.
        consumer = KafkaConsumer(bootstrap_servers=s.broker, enable_auto_commit=False,
                                 auto_offset_reset="earliest", fetch_max_wait_ms=10,
                                 **s.kafka_security())
        try:
            partitions = []
            deadline = time.monotonic() + WARMUP_TIMEOUT_S
            for topic in (s.scores_topic, s.next_items_topic, s.dlq_topic):
                while not consumer.partitions_for_topic(topic):
                    if self.stop.is_set() or time.monotonic() > deadline:
                        return
                    consumer.topics()        # refresh metadata until the worker created it
                    time.sleep(0.2)
                partitions += [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            consumer.assign(partitions)
            consumer.seek_to_beginning()
            while not self.stop.is_set():
                for tp, messages in consumer.poll(timeout_ms=200).items():
                    received = time.time()
                    for message in messages:
                        self._handle(tp.topic, message.value, received)
        finally:
            consumer.close()

    def _handle(self, topic: str, value: bytes, received: float) -> None:
        s, out = self.settings, self.outputs
        if topic == s.dlq_topic:
            with out.lock:
                out.dead_lettered += 1
            return
        record = json.loads(value)
        session = record["session_id"]
        with out.lock:
            if session == WARMUP_SESSION:
                out.warmed_up = True
                return
            if topic == s.scores_topic:
                out.scores += 1
                if record.get("outcome") == "transaction":
                    out.bought.add(session)
                    out.latest_buy.pop(session, None)
                elif record.get("buy_probability") is not None:
                    out.latest_buy[session] = record["buy_probability"]
                    out.last_buy_before_outcome[session] = record["buy_probability"]
            else:
                out.next_item_lists += 1
                out.out_times.append(received)
                out.latest_items[session] = record["items"]
                out.next_item_records.append((session, record["event_id"], record["items"]))
                sent = self.sent_at.get(record["event_id"])
                if sent is not None:
                    out.latencies_ms.append((received - sent) * 1000)


# --------------------------------------------------------------------------- processes

def _free_port() -> int:
    from stream.broker import free_port
    return free_port()


def start_worker(settings: Settings, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """`clickscore worker` as a child in its own process group (so it can be stopped whole)."""
    log_path = workdir / "worker.log"
    command = [sys.executable, "-m", "stream.cli", "worker",
               "--broker", settings.broker, "--model", settings.model,
               "--app-id", settings.app_id, "--partitions", str(settings.partitions),
               "--input-topic", settings.input_topic, "--scores-topic", settings.scores_topic,
               "--next-items-topic", settings.next_items_topic, "--dlq-topic", settings.dlq_topic,
               "--web-port", str(settings.web_port), "--metrics-port", str(settings.metrics_port),
               "--data-dir", str(workdir / "faust"), "--session-timeout-ms", "6000",
               "--heartbeat-interval-ms", "1000", "--rebalance-timeout-ms", "6000",
               "--execution-provider", settings.execution_provider, "--log-level", settings.log_level]
    with open(log_path, "wb") as log_file:
        # Dies with the demo, in its own process group. SIGKILL, because its broker dies
        # with the demo too: an orderly stop could commit nothing and would wait 10 s.
        process = lifecycle.spawn(command, death_signal=signal.SIGKILL, cwd=REPO, stdout=log_file,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, log_path


def stop_process_group(process: subprocess.Popen | None, timeout: float | None = None) -> None:
    """SIGTERM the worker's group; SIGKILL once `timeout` (default: what the stop
    deadline leaves, at most lifecycle.CHILD_GRACE_S) has passed."""
    lifecycle.stop_child(process, grace_s=timeout)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# The simulation the default model was trained on (its model card): replaying the
# *test* sessions of that same log gives live scores on a catalogue the model knows
# and on sessions it never trained on, so the summary's AUC and Recall@20 mean something.
DEFAULT_MODEL_SIMULATION = ("--sessions", "20000", "--items", "2000")


def simulate_log(workdir: Path, sessions: int, seed: int) -> Path:
    """The first `sessions` test-split sessions of the default model's simulated log."""
    import polars as pl

    full = workdir / "simulated.parquet"
    result = subprocess.run([sys.executable, "-m", "stream.cli", "simulate", *DEFAULT_MODEL_SIMULATION,
                             "--seed", str(seed), "--out", str(full)],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClickscoreError(f"`clickscore simulate` failed: {result.stderr.strip()[-800:]}")
    frame = pl.read_parquet(full).filter(pl.col("split") == "test")
    keep = frame["session_id"].unique(maintain_order=True).head(sessions)
    out = workdir / "simulated.jsonl"
    frame.filter(pl.col("session_id").is_in(keep.implode())).write_ndjson(out)
    return out


def send_warmup(settings: Settings, outputs: Outputs, worker: subprocess.Popen, log_path: Path) -> float:
    """Send a warm-up click every second until its next-item list comes back; seconds taken."""
    from stream.events import ClickEvent
    from stream.replay import make_producer, wire_json
    producer = make_producer(settings)
    began = time.monotonic()
    try:
        while True:
            with outputs.lock:
                if outputs.warmed_up:
                    return time.monotonic() - began
            if worker.poll() is not None:
                raise ClickscoreError(f"the worker exited with status {worker.returncode} before "
                                      f"scoring anything; its log ends:\n{tail(log_path)}")
            if time.monotonic() - began > WARMUP_TIMEOUT_S:
                raise ClickscoreError(f"the worker scored nothing within {WARMUP_TIMEOUT_S:.0f} s; "
                                      f"its log ends:\n{tail(log_path)}")
            event = ClickEvent(WARMUP_SESSION, "view", "0", int(time.time() * 1000),
                               event_id=f"warmup-{uuid.uuid4().hex[:8]}")
            producer.send(settings.input_topic, key=event.session_id.encode(), value=wire_json(event))
            producer.flush(timeout=10)
            time.sleep(1.0)
    finally:
        producer.close(timeout=5)


# --------------------------------------------------------------------------- the view

def render(outputs: Outputs, sent_times: deque, started: float, duration: float, top: int,
           worker_pid: int, broker: str) -> str:
    now = time.time()
    with outputs.lock:
        in_rate = sum(1 for t in sent_times if t > now - 5) / 5
        out_rate = sum(1 for t in outputs.out_times if t > now - 5) / 5
        recent = outputs.latencies_ms[-2000:]
        ranked = sorted(outputs.latest_buy.items(), key=lambda kv: kv[1], reverse=True)[:top]
        items = outputs.latest_items.get(ranked[0][0], []) if ranked else []
        lines = [
            f"clickscore demo  broker {broker}  worker pid {worker_pid}  "
            f"{time.monotonic() - started:5.0f} / {duration:.0f} s   (Ctrl-C stops)",
            "",
            f"events/s in {in_rate:8.1f}   out {out_rate:8.1f}   "
            f"latency p50 {_ms(percentile(recent, 50))}  p99 {_ms(percentile(recent, 99))}   "
            f"dead-lettered {outputs.dead_lettered}",
            f"sent {len(sent_times):,}   scores {outputs.scores:,}   next-item lists "
            f"{outputs.next_item_lists:,}   sessions bought {len(outputs.bought):,}",
            "",
            "highest buy probability now:",
        ]
        lines += [f"  {session:<24} {probability:6.3f}" for session, probability in ranked] or ["  (none yet)"]
        if ranked:
            lines += ["", f"next items for {ranked[0][0]}: {' '.join(items[:10])}"]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "   -   " if value is None else f"{value:6.0f} ms"


# --------------------------------------------------------------------------- evaluation

def evaluate(log_events: list, outputs: Outputs, k: int = 20) -> dict[str, Any]:
    """Buy AUC and Recall@k of what was emitted, against the replayed log."""
    buyers: set[str] = set()
    by_session: dict[str, list] = {}
    for event in log_events:
        by_session.setdefault(event.session_id, []).append(event)
        if event.is_transaction:
            buyers.add(event.session_id)
    next_item: dict[str, str] = {}
    for events in by_session.values():
        for current, following in zip(events, events[1:]):
            if current.event_id:
                next_item[current.event_id] = following.item_id
    with outputs.lock:
        # Each session's last probability before its first purchase (or its last one).
        sessions = list(outputs.last_buy_before_outcome)
        scores = [outputs.last_buy_before_outcome[s] for s in sessions]
        records = list(outputs.next_item_records)
    labels = [int(s in buyers) for s in sessions]
    hits = judged = 0
    for _session, event_id, items in records:
        target = next_item.get(event_id)
        if target is not None:
            judged += 1
            hits += target in items[:k]
    area = auc(scores, labels)
    return {"buy_auc": None if area is None else round(area, 4), "auc_sessions": len(sessions),
            "auc_buying_sessions": sum(labels), f"recall_at_{k}": round(hits / judged, 4) if judged else None,
            "recall_lists_judged": judged}


# --------------------------------------------------------------------------- main

def demo(settings: Settings, *, input_path: str | None, dataset: str, sessions: int, seed: int,
         duration: float, rate: float | None, speed: float | None, refresh_s: float, view: str,
         top: int) -> dict[str, Any]:
    from stream.broker import EmbeddedBroker
    from stream.replay import ensure_topic, load, replay, select

    model = Path(settings.model)
    if not (model / "model.onnx").is_file():
        raise ClickscoreError(f"no exported model in {model} (model.onnx missing): run `clickscore export "
                              f"--out {model}` or pass --model")
    ansi = view == "ansi" or (view == "auto" and sys.stdout.isatty())
    summary: dict[str, Any] = {"ok": False}
    worker = reader = None
    broker_proc = EmbeddedBroker()
    stopping = lifecycle.stopping()
    with tempfile.TemporaryDirectory(prefix="clickscore-demo-") as tmp:
        workdir = Path(tmp)
        try:
            with lifecycle.interruptible():   # a signal during set-up abandons it (finally stops all)
                bootstrap = broker_proc.start()
                settings = settings.with_(
                    broker=bootstrap, app_id=f"demo-{uuid.uuid4().hex[:8]}", web_port=_free_port(),
                    metrics_port=_free_port())
                source = Path(input_path) if input_path else simulate_log(workdir, sessions, seed)
                log = load(source, dataset)
                log_events = select(log.events)
                # Created here, before anything produces, so no client auto-creates it with
                # the broker's default partition count.
                ensure_topic(settings, settings.input_topic, settings.partitions)
                worker, worker_log = start_worker(settings, workdir)
                summary.update(broker=bootstrap, broker_pid=broker_proc.process.pid, worker_pid=worker.pid,
                               web_port=settings.web_port, metrics_port=settings.metrics_port, input=str(source))
                outputs = Outputs()
                sent_at: dict[str, float] = {}
                sent_times: deque = deque(maxlen=1_000_000)
                reader = OutputReader(settings, outputs, sent_at)
                reader.start()
                summary["warmup_s"] = round(send_warmup(settings, outputs, worker, worker_log), 1)

            stop = threading.Event()

            def on_sent(event) -> None:
                now = time.time()
                if event.event_id:
                    sent_at[event.event_id] = now
                sent_times.append(now)

            replay_result: dict[str, Any] = {}

            def run_replay() -> None:
                try:
                    replay_result.update(replay(
                        source, settings.input_topic, settings=settings, dataset=dataset,
                        speed=speed, rate=rate, progress=False, stop=stop, on_sent=on_sent,
                        create_topic=False))
                except BaseException as exc:
                    replay_result["error"] = f"{type(exc).__name__}: {exc}"

            replayer = threading.Thread(target=run_replay, name="demo-replay", daemon=True)
            started = time.monotonic()
            replayer.start()
            interrupted = False
            try:
                while time.monotonic() - started < duration and replayer.is_alive() and not stopping.is_set():
                    if worker.poll() is not None:
                        raise ClickscoreError(f"the worker exited with status {worker.returncode}; "
                                              f"its log ends:\n{tail(worker_log)}")
                    frame = render(outputs, sent_times, started, duration, top, worker.pid, bootstrap)
                    if ansi:
                        sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n")
                    else:
                        sys.stdout.write(frame.splitlines()[2] + "\n")
                    sys.stdout.flush()
                    stopping.wait(refresh_s if ansi else max(refresh_s, 5.0))
            except KeyboardInterrupt:
                interrupted = True
            # Stopped by a signal: no drain, and every wait below fits in the stop deadline.
            interrupted = interrupted or stopping.is_set()
            stop.set()
            replayer.join(timeout=min(30.0, max(0.1, lifecycle.remaining_s(30.0) - 6.0)))
            deadline = time.monotonic() + (0.0 if stopping.is_set() else DRAIN_S)
            while time.monotonic() < deadline:
                with outputs.lock:
                    if outputs.next_item_lists >= len(sent_times):
                        break
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            with outputs.lock:
                latencies = list(outputs.latencies_ms)
                summary.update(
                    events_sent=replay_result.get("sent", len(sent_times)),
                    replay_error=replay_result.get("error"),
                    malformed=replay_result.get("malformed"),
                    scores=outputs.scores, next_item_lists=outputs.next_item_lists,
                    dead_lettered=outputs.dead_lettered, sessions_scored=len(outputs.last_buy_before_outcome),
                    rate_in_eps=round(len(sent_times) / elapsed, 1),
                    rate_out_eps=round(outputs.next_item_lists / elapsed, 1))
            summary.update(latency_p50_ms=_round(percentile(latencies, 50)),
                           latency_p99_ms=_round(percentile(latencies, 99)),
                           interrupted=interrupted, duration_s=round(elapsed, 1))
            summary.update(evaluate(log_events, outputs, k=20))
            if reader.error is not None:
                raise ClickscoreError(f"reading the output topics failed: {reader.error}")
            summary["ok"] = summary["scores"] > 0
        finally:
            if reader is not None:
                reader.stop.set()
                reader.join(timeout=min(10.0, lifecycle.remaining_s(10.0) / 4))
            stop_process_group(worker)   # the worker first: it still talks to the broker
            broker_proc.stop()
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_summary(summary: dict[str, Any]) -> str:
    def show(key: str, fmt: str = "{}") -> str:
        value = summary.get(key)
        return "-" if value is None else fmt.format(value)
    return "\n".join([
        "clickscore demo summary",
        f"  events sent {show('events_sent', '{:,}')} ({show('rate_in_eps')} /s), next-item lists "
        f"{show('next_item_lists', '{:,}')} ({show('rate_out_eps')} /s), buy scores {show('scores', '{:,}')}, "
        f"dead-lettered {show('dead_lettered')}",
        f"  latency send -> output p50 {show('latency_p50_ms')} ms, p99 {show('latency_p99_ms')} ms",
        f"  buy AUC {show('buy_auc')} over {show('auc_sessions')} sessions "
        f"({show('auc_buying_sessions')} buy); Recall@20 {show('recall_at_20')} over "
        f"{show('recall_lists_judged', '{:,}')} next-item lists",
        f"  worker pid {show('worker_pid')}, broker pid {show('broker_pid')} on {show('broker')}: stopped",
    ])


def run(args: argparse.Namespace) -> int:
    """`clickscore demo`. SIGTERM, SIGINT or SIGHUP end it early like the end of
    --duration (summary printed, worker and broker stopped; exit 0), within the stop
    deadline of stream/lifecycle.py; during set-up they abandon it (exit 0)."""
    settings = settings_from_args(args)
    lifecycle.install()
    try:
        summary = demo(settings, input_path=args.input, dataset=args.dataset, sessions=args.sessions,
                       seed=args.seed, duration=args.duration, rate=args.rate, speed=args.speed,
                       refresh_s=args.refresh_s, view=args.view, top=args.top)
    except lifecycle.StopRequested:
        print("clickscore demo: stopped before the replay began; broker and worker stopped", file=sys.stderr)
        return lifecycle.EXIT_OK
    print(format_summary(summary))
    if args.json:
        print(json.dumps(summary))
    if summary.get("replay_error"):
        print(f"clickscore demo: error: the replay failed: {summary['replay_error']}", file=sys.stderr)
        return 1
    if not summary["ok"] and not lifecycle.stopping().is_set():
        print("clickscore demo: error: no scores arrived from the worker", file=sys.stderr)
        return 1
    return 0
