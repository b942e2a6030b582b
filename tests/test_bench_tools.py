"""The benchmarks' own logic that their figures rest on (no broker).

    .venv/bin/python -m pytest tests/test_bench_tools.py -q

bench/io_floor.py sends, per session and batch, a changelog record of the size the
worker's state value has: if that size drifted from stream/session_state.py, the floor
would stop bounding the worker. bench/pipeline.py must account for every event it
drives through the worker's batch logic, or its CPU per event would be per nothing.
"""
from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.io_floor import state_bytes
from stream.events import ClickEvent
from stream.features import WINDOW, FeatureArtefacts
from stream.session_state import advance

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = FeatureArtefacts(items=("a", "b"), categories=("x",), dwell_mean=0.0, dwell_std=1.0,
                             price_mean=0.0, price_std=1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=WINDOW + 40))
def test_io_floor_changelog_record_is_the_worker_state_size(events):
    state = None
    for i in range(events):
        state = advance(state, ClickEvent("s", "view", "ab"[i % 2], 1_767_571_253_772 + i * 1000),
                        ARTEFACTS, 0, i, 3_600_000)
    assert len(state.to_bytes()) == state_bytes(events)


def test_pipeline_bench_scores_every_event_and_reports_each_stage(tmp_path):
    from bench.pipeline import STAGES, run
    from bench.stream import simulated_events

    events = simulated_events(400, tmp_path)
    figures = run(events, REPO / "onnx_models" / "default", batch_size=64)
    assert figures["scored"] == len(events) and figures["dead_lettered"] == 0
    assert all(figures[f"{stage}_us_per_event"] > 0 for stage in STAGES)
    cache = figures["cache"]
    assert cache["hits"] + cache["misses"] + cache["too_long"] + cache["deep"] == len(events)


def test_figures_of_several_worker_processes_add_up_across_their_metrics_ports():
    """bench.stream --worker-processes N scrapes N metrics ports: counters, histogram
    buckets and stage sums must add across them (two real Prometheus endpoints here)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

    from bench.stream import events_consumed, scrape_histogram, scrape_stages
    from conftest import free_port

    ports = []
    for consumed, lags, stage_s in ((3, [0.001, 0.2], 0.5), (5, [0.003], 0.25)):
        registry = CollectorRegistry()
        Counter("clickscore_events_consumed", "", ["topic"], registry=registry).labels(topic="t").inc(consumed)
        lag = Histogram("clickscore_event_loop_lag_seconds", "", buckets=(0.005, 0.1, 1.0), registry=registry)
        for value in lags:
            lag.observe(value)
        Histogram("clickscore_stage_seconds", "", ["stage"], registry=registry).labels(stage="prepare").observe(stage_s)
        ports.append(free_port())
        start_http_server(ports[-1], addr="127.0.0.1", registry=registry)
    assert events_consumed(ports) == 8 and events_consumed(ports[0]) == 3
    lag = scrape_histogram(ports, "clickscore_event_loop_lag_seconds")
    assert lag["count"] == 3 and lag["0.005"] == 2 and lag["1.0"] == 3 and abs(lag["sum"] - 0.204) < 1e-9
    assert scrape_stages(ports)["prepare"] == (0.75, 2.0)
