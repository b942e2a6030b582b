"""Prometheus metrics, declared once: the names here are the contract that
deploy/alerts.yml, deploy/grafana/clickscore-dashboard.json and deploy/README.md rely on.

    from stream import metrics
    metrics.EVENTS_CONSUMED.labels(topic=settings.input_topic).inc(len(batch))
    with metrics.INFERENCE_SECONDS.time(): ...
    if settings.metrics_port:   # `clickscore worker --metrics-port 0`: no metrics served
        metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)

The worker's metrics live in `REGISTRY`, the trigger sink's in `SINK_REGISTRY`: each
process serves only its own, so a scrape of the sink never shows idle worker series.
Both registries also carry the usual process_* and python_* collectors.
"""
from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, GCCollector,
                               PlatformCollector, ProcessCollector, start_http_server)

log = logging.getLogger(__name__)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# Bucket edges, seconds unless named otherwise.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_END_TO_END = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_PROBABILITY = tuple(round(0.05 * i, 2) for i in range(1, 21))   # 0.05 .. 1.0
_LOOP_LAG = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_DELIVERY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# -- worker (stream/app.py) ---------------------------------------------------------------
REGISTRY = _registry()

EVENTS_CONSUMED = Counter(
    "clickscore_events_consumed", "click events read from Kafka", ["topic"], registry=REGISTRY)
EVENTS_SCORED = Counter(
    "clickscore_events_scored", "events scored and sent on", ["topic"], registry=REGISTRY)
EVENTS_DEAD_LETTERED = Counter(
    "clickscore_events_dead_lettered", "input events sent to the dead-letter topic, by reason",
    ["reason"], registry=REGISTRY)
INTERNAL_ERRORS = Counter(
    "clickscore_internal_errors", "input events dead-lettered as internal_error, by exception type "
    "(a bug to report: the event broke no rule we know)", ["exception"], registry=REGISTRY)
OUTPUT_SEND_FAILURES = Counter(
    "clickscore_output_send_failures", "output records whose delivery failed (each is retried; "
    "the batch's offsets are not committed until all are delivered)", ["topic"], registry=REGISTRY)
INFERENCE_SECONDS = Histogram(
    "clickscore_inference_seconds", "model call time per micro-batch",
    buckets=_FAST, registry=REGISTRY)
BATCH_SIZE = Histogram(
    "clickscore_batch_size", "events per model call", buckets=_BATCH, registry=REGISTRY)
END_TO_END_SECONDS = Histogram(
    "clickscore_end_to_end_seconds", "Kafka append time of a click to its score being sent",
    buckets=_END_TO_END, registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "clickscore_consumer_lag", "messages behind the partition's end offset",
    ["topic", "partition"], registry=REGISTRY)
ACTIVE_SESSIONS = Gauge(
    "clickscore_active_sessions", "sessions held in this worker's table", registry=REGISTRY)
SESSION_STATE_BYTES = Gauge(
    "clickscore_session_state_bytes", "bytes of session state held by this worker",
    registry=REGISTRY)
STATE_MIGRATIONS = Counter(
    "clickscore_state_migrations", "session states stored by an older state layout and converted "
    "on read (stream/session_state.py), by the version they had", ["from_version"], registry=REGISTRY)
REDELIVERED_COMMITTED = Counter(
    "clickscore_redelivered_committed", "input records fetched again below the partition's committed "
    "offset (after a seek or rebalance): already scored and delivered, acked without scoring",
    registry=REGISTRY)
TRIGGERS_FIRED = Counter(
    "clickscore_triggers_fired", "marketing triggers fired, by rule", ["rule"], registry=REGISTRY)
BUY_PROBABILITY = Histogram(
    "clickscore_buy_probability", "buy probabilities emitted", buckets=_PROBABILITY,
    registry=REGISTRY)
MODEL_INFO = Gauge(
    "clickscore_model_info", "the served model (value is always 1)",
    ["name", "version", "provider"], registry=REGISTRY)
EVENT_LOOP_LAG_SECONDS = Histogram(
    "clickscore_event_loop_lag_seconds", "how late the event loop ran a scheduled callback",
    buckets=_LOOP_LAG, registry=REGISTRY)
# Where an event's latency goes, stage by stage (stream/app.py). `consume` and `batch_fill`
# are observed per event, the others per micro-batch; their sum is close to
# clickscore_end_to_end_seconds. docs/operations.md ("Where the latency goes") reads them.
STAGES = ("consume", "batch_fill", "prepare", "inference_queue", "inference", "delivery_queue",
          "finish", "deliver")
STAGE_SECONDS = Histogram(
    "clickscore_stage_seconds", "time spent per stage: consume (Kafka append to the worker taking it from Faust's queue), batch_fill "
    "(taken to batch begun), prepare (decode and state), inference_queue, inference, delivery_queue "
    "(scored, waiting for earlier batches' delivery), finish (outputs built), deliver (sent and "
    "acknowledged by the broker)", ["stage"], buckets=_FAST, registry=REGISTRY)
for _stage in STAGES:
    STAGE_SECONDS.labels(stage=_stage)   # export zeros so rate() works from the start
UNREADABLE_BATCHES = Counter(
    "clickscore_unreadable_batches", "record batches the worker could not decompress (codec "
    "unknown, library missing, corrupt payload); the worker stops on the first", ["topic", "partition", "codec"],
    registry=REGISTRY)

# -- trigger sink (stream/sink.py) -----------------------------------------------------
SINK_REGISTRY = _registry()

SINK_DELIVERIES = Counter(
    "clickscore_sink_deliveries", "triggers handled, by outcome (delivered, dead_lettered)",
    ["outcome"], registry=SINK_REGISTRY)
SINK_DELIVERY_SECONDS = Histogram(
    "clickscore_sink_delivery_seconds", "time from a trigger's first attempt to its outcome, "
    "retries included", buckets=_DELIVERY, registry=SINK_REGISTRY)
SINK_RETRIES = Counter(
    "clickscore_sink_retries", "webhook attempts after the first", registry=SINK_REGISTRY)
for _outcome in ("delivered", "dead_lettered"):
    SINK_DELIVERIES.labels(outcome=_outcome)   # export zeros so rate() works from the start


def set_model_info(name: str, version: str, provider: str) -> None:
    """One series with value 1 naming the model now served (replaces any earlier one)."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(name=name, version=version, provider=provider).set(1)


def start_metrics_server(host: str, port: int, registry: CollectorRegistry = REGISTRY
                         ) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics from a daemon thread on `port` (`server.server_port`).

    Passed 0, prometheus_client binds a free port, but neither command asks for that:
    `clickscore worker --metrics-port 0` means metrics off (this is not called), and the
    sink's off switch is `--metrics-port -1`."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
