"""The worker's model-state cache (stream/model_cache.py) without Faust: the real batch
logic (pipeline.prepare over a dict table) and real exported GRU and dilated models. Every
score through the cache equals the window graph's within 1e-5, across several events of
a session in one batch, sessions longer than the window, a restart (empty cache), a
rebalance (stale entries), re-delivered events and a tight byte bound.

    .venv/bin/python -m pytest tests/test_model_cache.py -q
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import build_model  # noqa: E402
from stream import model_cache, pipeline  # noqa: E402
from stream.model_cache import ModelStateCache, fingerprint, score_cached  # noqa: E402
from stream.scoring import ModelScorer  # noqa: E402

TOLERANCE = 1e-5
TOP_K = 10
TIMEOUT_MS = 100 * 86400 * 1000


@pytest.fixture(scope="module", params=["gru", "dilated"])
def trained(request, tmp_path_factory):
    """(scorer, simulated log) of a small model made by the real simulate/prepare/train/export."""
    root = build_model(tmp_path_factory.mktemp(f"cache-{request.param}"), kind=request.param).parent
    log = pl.read_parquet(root / "sim.parquet").sort("timestamp", maintain_order=True)
    return ModelScorer(root / "model", provider="cpu"), log


def records_of(log: pl.DataFrame, limit: int) -> list[pipeline.Record]:
    """The simulated log as Kafka records of one partition: each session's events in order,
    sessions interleaved round-robin (so they span batches), some longer than the window."""
    lengths = log.group_by("session_id").len()
    long = lengths.filter(pl.col("len") > 110)["session_id"].sort().head(3).to_list()
    short = lengths.filter(pl.col("len").is_between(2, 60))["session_id"].sort().head(60).to_list()
    assert long, "the simulated log must hold sessions longer than the window"
    queues = [log.filter(pl.col("session_id") == s).to_dicts() for s in long + short]
    rows = []
    while len(rows) < limit and any(queues):
        for queue in queues:
            if queue:
                rows.append(queue.pop(0))
    out = []
    for offset, row in enumerate(rows[:limit]):
        event = {k: row[k] for k in ("session_id", "event_type", "item_id", "category_id", "price", "timestamp")
                 if row[k] is not None}
        out.append(pipeline.Record("clicks", 0, offset, row["session_id"].encode(), json.dumps(event).encode()))
    return out


def run_batches(scorer, records, batch_size: int, cache: ModelStateCache | None, table: dict | None = None):
    """prepare -> score_cached for each batch; asserts every event equals the window graph."""
    table = {} if table is None else table
    worst = 0.0
    for start in range(0, len(records), batch_size):
        batch = pipeline.prepare(records[start:start + batch_size], table.get, scorer.artefacts, TIMEOUT_MS, 1 << 16)
        for key, (value, _) in batch.state_writes.items():
            table[key] = value
        want = scorer.score(batch.windows, top_k=TOP_K)
        got = score_cached(scorer, cache, batch.accepted, TOP_K) if cache is not None else None
        assert not got.failed
        worst = max(worst, float(np.max(np.abs(got.buy_probability - want.buy_probability), initial=0)))
        np.testing.assert_allclose(got.buy_probability, want.buy_probability, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(got.top_scores, want.top_scores, rtol=0, atol=TOLERANCE)
        swapped = got.top_items != want.top_items   # only a near-tie may swap places
        assert np.all(np.abs(got.top_scores - want.top_scores)[swapped] <= TOLERANCE)
    return table, worst


def test_cache_scores_equal_the_window_graph_and_mostly_step(trained):
    scorer, log = trained
    records = records_of(log, 3000)
    cache = ModelStateCache(64 << 20)
    hits0, misses0, long0, deep0 = cache.hits, cache.misses, cache.too_long, cache.deep
    run_batches(scorer, records, 64, cache)
    # Every event of a short session is a step (first events from the initial state,
    # later ones from the previous event, in this batch or the cache): no misses at all.
    assert cache.misses - misses0 == 0
    assert cache.too_long - long0 > 0                  # the long sessions past event 100
    assert cache.hits - hits0 + cache.too_long - long0 + cache.deep - deep0 == len(records)
    assert len(cache) > 0 and cache.nbytes == sum(e.nbytes + len(k) for k, e in cache._entries.items())


def test_many_events_of_one_session_in_one_batch_are_stepped_in_order(trained):
    scorer, log = trained
    records = records_of(log, 3000)
    cache = ModelStateCache(64 << 20)
    calls = []
    step = scorer.score_step

    def counted(windows, states, top_k):
        calls.append(len(windows))
        return step(windows, states, top_k)
    scorer.score_step = counted
    try:
        run_batches(scorer, records, 512, cache)     # big batches: sessions recur within a batch
    finally:
        del scorer.score_step
    assert cache.misses == 0
    # At most MAX_ROUNDS step calls a batch; the deeper events of a session went to the window call.
    n_batches = -(-len(records) // 512)
    assert len(calls) <= model_cache.MAX_ROUNDS * n_batches and cache.deep > 0


def test_restart_rebalance_and_redelivery_rebuild_from_windows(trained):
    scorer, log = trained
    records = records_of(log, 2400)
    third = len(records) // 3
    a = ModelStateCache(64 << 20)
    table, _ = run_batches(scorer, records[:third], 32, a)
    # Restart: a new worker's cache is empty; the table (changelog) is restored.
    b = ModelStateCache(64 << 20)
    table, _ = run_batches(scorer, records[third:2 * third], 32, b, table)
    assert b.misses > 0
    # Rebalance back to the first worker: its entries are stale (the sessions moved on
    # meanwhile), so they must miss, never step from the old state.
    misses_before = a.misses
    table, _ = run_batches(scorer, records[2 * third:], 32, a, table)
    assert a.misses > misses_before
    # Re-delivery after a crash: already applied records are scored from the replayed window.
    replay_from = 2 * third - 40
    run_batches(scorer, records[replay_from:2 * third + 40], 32, ModelStateCache(64 << 20), table)


def test_a_session_that_restarts_with_the_same_count_does_not_reuse_the_old_state(trained):
    """A stale entry can carry the same event count as the new window's prefix (a session
    timed out and started again on another worker): the fingerprint tells them apart."""
    scorer, log = trained
    records = records_of(log, 3000)
    key = records[0].key
    mine = [r for r in records if r.key == key][:6]
    cache = ModelStateCache(64 << 20)
    table, _ = run_batches(scorer, mine[:3], 1, cache)
    # The same session id, new content: different items, same counts.
    fresh = []
    for i, r in enumerate(mine[3:6]):
        event = json.loads(r.value)
        event["item_id"] = f"other-{i}"
        fresh.append(pipeline.Record(r.topic, r.partition, 1000 + i, r.key, json.dumps(event).encode()))
    other_table: dict = {}
    run_batches(scorer, fresh[:2], 1, ModelStateCache(64 << 20), other_table)   # elsewhere: counts 1, 2
    misses = cache.misses
    run_batches(scorer, fresh[2:], 1, cache, other_table)    # count 3 follows count 2: same tag, other rows
    assert cache.misses == misses + 1


def test_byte_bound_evicts_least_recently_used_and_scores_stay_exact(trained):
    scorer, log = trained
    records = records_of(log, 1500)
    per_entry = scorer.state_nbytes + model_cache.FINGERPRINT_BYTES + model_cache.ENTRY_OVERHEAD_BYTES + 40
    cache = ModelStateCache(per_entry * 5)       # room for about five sessions
    run_batches(scorer, records, 16, cache)
    assert cache.evictions > 0 and cache.misses > 0
    assert cache.nbytes <= cache.max_bytes and len(cache) <= 5


def test_lru_tags_and_model_binding():
    cache = ModelStateCache(3 * (4 * 8 + model_cache.FINGERPRINT_BYTES + model_cache.ENTRY_OVERHEAD_BYTES + 2))
    state = np.arange(8, dtype=np.float32)
    rows = np.arange(10, dtype=np.int64)
    for key in (b"s1", b"s2", b"s3"):
        cache.put(key, state, 4, fingerprint(rows))
    assert cache.get(b"s1", 4, fingerprint(rows)) is not None     # s1 is now the most recent
    assert cache.get(b"s1", 5, fingerprint(rows)) is None         # another count
    assert cache.get(b"s1", 4, fingerprint(rows[:-1])) is None    # other rows
    cache.put(b"s4", state, 1, fingerprint(rows))                 # evicts s2, the least recent
    assert cache.get(b"s2", 4, fingerprint(rows)) is None and cache.evictions == 1
    assert cache.get(b"s1", 4, fingerprint(rows)) is not None and len(cache) == 3
    cache.bind("model a")
    assert len(cache) == 0 and cache.nbytes == 0                  # states belong to one model
    cache.put(b"s1", state, 4, fingerprint(rows))
    cache.bind("model a")
    assert len(cache) == 1
    cache.bind("model b")
    assert len(cache) == 0


def test_model_fault_falls_back_to_isolating_the_culprit(trained):
    """A step graph that raises: the batch is re-scored on the plain path, which fails only
    the culprit (scoring_failed), and no state of those sessions is kept."""
    scorer, log = trained
    records = records_of(log, 200)
    batch = pipeline.prepare(records, {}.get, scorer.artefacts, TIMEOUT_MS, 1 << 16)

    class Faulty:
        def __init__(self, inner):
            self.inner = inner
            self.artefacts, self.state_size = inner.artefacts, inner.state_size
            self.bad = batch.accepted[5].window

        def score_step(self, windows, states, top_k):
            raise RuntimeError("step graph failed")

        def score_windows_with_state(self, windows, top_k):
            return self.inner.score_windows_with_state(windows, top_k)

        def score(self, windows, top_k):
            if any(w is self.bad for w in windows):
                raise RuntimeError("this window breaks the model")
            return self.inner.score(windows, top_k)

    cache = ModelStateCache(64 << 20)
    got = score_cached(Faulty(scorer), cache, batch.accepted, TOP_K)
    assert set(got.failed) == {5}
    want = scorer.score(batch.windows, top_k=TOP_K)
    ok = np.arange(len(batch.accepted)) != 5
    np.testing.assert_allclose(got.buy_probability[ok], want.buy_probability[ok], rtol=0, atol=TOLERANCE)
    assert len(cache) == 0


def test_io_binding_path_gives_the_same_scores_on_the_cpu(trained):
    """The IOBinding path (on by default with the CUDA provider only) run on the CPU
    provider: same numbers as session.run, window and step graphs."""
    scorer, log = trained
    records = records_of(log, 300)
    batch = pipeline.prepare(records, {}.get, scorer.artefacts, TIMEOUT_MS, 1 << 16)
    assert not scorer.use_io_binding        # the CPU provider: plain session.run
    plain = score_cached(scorer, ModelStateCache(64 << 20), batch.accepted, TOP_K)
    scorer.use_io_binding = True
    try:
        bound = score_cached(scorer, ModelStateCache(64 << 20), batch.accepted, TOP_K)
        window = scorer.score(batch.windows, top_k=TOP_K)
    finally:
        scorer.use_io_binding = None
    np.testing.assert_array_equal(bound.buy_probability, plain.buy_probability)
    np.testing.assert_array_equal(bound.top_items, plain.top_items)
    np.testing.assert_allclose(window.buy_probability, plain.buy_probability, rtol=0, atol=TOLERANCE)
