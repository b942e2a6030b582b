"""Inference in a child process (stream/inference.py, `clickscore worker --inference-process
true`) without Faust: the real batch logic, real exported GRU and dilated models, a real
child process. Its scores equal the window graph's within 1e-5 (through the child's
model-state cache); a child that dies is replaced (its states rebuilt from windows) and a
batch it cannot score is scored by the worker itself; a model swap reaches the child;
its cache counters reach the worker's metrics.

    .venv/bin/python -m pytest tests/test_inference_process.py -q
"""
from __future__ import annotations

import copy
import dataclasses
import os
import signal
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from stream import model_cache, pipeline
from stream.features import EVENT_ROW
from stream.inference import InferenceProcess, pack, unpack
from stream.metrics import REGISTRY
from stream.registry import ModelTagged
from test_model_cache import TIMEOUT_MS, TOLERANCE, TOP_K, records_of, trained  # noqa: F401  (fixture)


def assert_equal_to_window_graph(scorer, got: pipeline.Scores, windows) -> None:
    want = scorer.score(windows, top_k=TOP_K)
    assert not got.failed
    np.testing.assert_allclose(got.buy_probability, want.buy_probability, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(got.top_scores, want.top_scores, rtol=0, atol=TOLERANCE)
    swapped = got.top_items != want.top_items   # only a near-tie may swap places
    assert np.all(np.abs(got.top_scores - want.top_scores)[swapped] <= TOLERANCE)


def batches(scorer, records, size: int, table: dict):
    for start in range(0, len(records), size):
        batch = pipeline.prepare(records[start:start + size], table.get, scorer.artefacts, TIMEOUT_MS, 1 << 16)
        for key, (value, _) in batch.state_writes.items():
            table[key] = value
        yield batch


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_child_scores_equal_the_window_graph_and_step_from_its_cache(trained):
    scorer, log = trained
    served = ModelTagged(scorer, scorer.info.name, scorer.info.version)
    remote = InferenceProcess("cpu", 1, 64 << 20)
    names = [f"clickscore_model_cache_{n}_total" for n in ("hits", "misses", "too_long", "deep")]
    before = [metric(n) for n in names]
    n_events = 0
    try:
        pid = remote.pid
        for batch in batches(scorer, records_of(log, 1500), 64, {}):
            got, t0, t1 = remote.score(served, batch.accepted, TOP_K)
            assert t1 >= t0
            assert_equal_to_window_graph(scorer, got, batch.windows)
            n_events += len(batch.accepted)
        assert remote.pid == pid and remote.failures == 0      # one child did it all
        # The child's tallies reached this process's counters: every event stepped or went
        # to the window graph as too long or too deep; no misses (one cache throughout).
        hits, misses, too_long, deep = (metric(n) - b for n, b in zip(names, before))
        assert misses == 0 and hits > n_events / 2
        assert hits + too_long + deep == n_events
        assert metric("clickscore_model_cache_sessions") > 0
    finally:
        remote.close()
    assert remote.pid is None


def test_a_child_that_dies_is_replaced_and_a_failed_batch_is_scored_here(trained, tmp_path):
    scorer, log = trained
    served = ModelTagged(scorer, scorer.info.name, scorer.info.version)
    remote = InferenceProcess("cpu", 1, 64 << 20)
    starts0 = metric("clickscore_inference_process_starts_total")
    failures0 = metric("clickscore_inference_process_failures_total")
    try:
        parts = list(batches(scorer, records_of(log, 900), 64, {}))
        for batch in parts[:4]:
            remote.score(served, batch.accepted, TOP_K)
        first = remote.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while remote._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        # Found dead before the next batch: a new child (empty cache) scores it, from windows.
        got, _, _ = remote.score(served, parts[4].accepted, TOP_K)
        assert_equal_to_window_graph(scorer, got, parts[4].windows)
        assert remote.pid not in (None, first)
        assert metric("clickscore_inference_process_starts_total") - starts0 == 1
        # A batch the child cannot score (here: the model folder it is told to load is
        # gone) is scored by the worker itself, with the model it has in memory.
        gone = copy.copy(scorer)
        gone.info = dataclasses.replace(scorer.info, path=str(tmp_path / "gone"))
        got, _, _ = remote.score(ModelTagged(gone, "gone", "1"), parts[5].accepted, TOP_K)
        assert_equal_to_window_graph(scorer, got, parts[5].windows)
        assert remote.failures == 1
        assert metric("clickscore_inference_process_failures_total") - failures0 == 1
        for batch in parts[6:]:
            got, _, _ = remote.score(served, batch.accepted, TOP_K)
            assert_equal_to_window_graph(scorer, got, batch.windows)
        assert remote.failures == 1
    finally:
        remote.close()


def test_a_model_swap_reaches_the_child(trained, tmp_path_factory):
    from bench.workerkit import build_model
    from stream.scoring import ModelScorer
    scorer, log = trained
    other = ModelScorer(build_model(tmp_path_factory.mktemp("swap"), kind="gru", train_seed=7), provider="cpu")
    remote = InferenceProcess("cpu", 1, 64 << 20)
    try:
        parts = list(batches(scorer, records_of(log, 400), 100, {}))
        for batch, model in zip(parts, (scorer, other, other, scorer)):
            got, _, _ = remote.score(ModelTagged(model, model.info.name, model.info.version), batch.accepted, TOP_K)
            assert_equal_to_window_graph(model, got, batch.windows)
    finally:
        remote.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), max_size=8))
def test_pack_unpack_keeps_every_window_and_tag(lengths):
    rng = np.random.default_rng(len(lengths))
    accepted = []
    for i, n in enumerate(lengths):
        window = np.zeros(n, dtype=EVENT_ROW)
        window["item"] = rng.integers(0, 1000, n)
        accepted.append(pipeline.Accepted(i, None, f"s{i}".encode(), window, n + i, False, False, i % 2 == 0))
    back = unpack(pack(accepted))
    assert len(back) == len(accepted)
    for a, b in zip(accepted, back):
        assert (a.key, a.event_count, a.replayed) == (b.key, b.event_count, b.replayed)
        assert b.window.dtype == EVENT_ROW and np.array_equal(a.window, b.window)
