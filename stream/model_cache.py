"""Per-session model state kept in the inference thread's memory: score a new event with
the step graph from the state after the session's previous event, instead of re-running
its whole window. Plain code, no Faust; stream/app.py calls it from the inference thread.

    cache = ModelStateCache(max_bytes=256 << 20)
    scores = score_cached(scorer, cache, batch.accepted, top_k=20)   # -> pipeline.Scores
    # [Accepted] -> per event: a hit (step graph), a miss (window graph, one batched call),
    #               or a session longer than the window (window graph)

The changelog keeps the session window, which stays the source of truth; this cache is
only a shortcut, and every score equals the window graph's (within 1e-5; tests/
test_model_cache.py, tests/test_worker.py). Why each rule:

- An entry is tagged with the event count it follows and a fingerprint (blake2b) of the
  window rows it was computed from. A hit needs both to match the new window minus its
  newest row. The fingerprint makes a stale entry harmless whatever made it stale: a
  partition that went to another worker and came back, a restart, a session that timed
  out and started again with the same count, a re-delivered event. So no rebalance or
  restart hook is needed for correctness: whatever does not match is a miss.
- A miss (new worker, restart, rebalance, model swap, evicted) re-runs the window graph,
  which returns the state as well: all misses of a batch go in one batched call.
- A session's first event steps from the initial (zero) state: no lookup needed.
- Sessions longer than the window: the window graph forgets the oldest events but a
  carried state never would, so those events are scored by the window graph
  (`step_exact`), counted in clickscore_model_cache_too_long_total.
- Several events of one session in one batch are stepped in rounds: round r steps every
  session's r-th chained event, so each step starts from the state of the one before.
  At most MAX_ROUNDS rounds a batch: a session's further events in the batch go to the
  batched window call (clickscore_model_cache_deep_total), and the next ones step from
  the state that call returns.
- Bounded by bytes (state + key + fingerprint + an estimate of Python's per-entry
  overhead), least recently used out.
- Bound to one model: a different scorer (hot swap) empties it (`bind`).
- A model fault or a non-finite row: those events are re-scored by the plain window path
  (pipeline.score_isolated, which isolates the culprits) and their sessions dropped from
  the cache, so a bad state is never carried on.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from prometheus_client import Counter, Gauge

from stream import pipeline
from stream.metrics import REGISTRY
from stream.scoring import step_exact

log = logging.getLogger("clickscore.worker")

# Python's own cost of one entry beyond the arrays' data: the OrderedDict slot and node,
# the entry object, the numpy array header and two bytes objects' headers (measured with
# sys.getsizeof on CPython 3.11: about 290 bytes). An estimate: the bound is approximate.
ENTRY_OVERHEAD_BYTES = 300
# Step calls per batch at most: each round is one onnxruntime call plus Python that holds
# the GIL the event loop needs. A saturated worker fed a pre-produced log saw ~60 events of
# one session in a batch of 256, i.e. ~60 rounds; past MAX_ROUNDS the window graph (one
# batched call, GIL released) is cheaper for the whole worker. Offline on that log (batch
# 256, one thread, loaded machine): 2 rounds 201, 4: 143, 8: 111, 16: 117, 64: 140 us/event
# (window graph alone: 516).
MAX_ROUNDS = 8
FINGERPRINT_BYTES = 16

CACHE_HITS = Counter(
    "clickscore_model_cache_hits", "events scored by the step graph from a carried model state "
    "(cache entry, the session's previous event in the same batch, or a new session's initial state)",
    registry=REGISTRY)
CACHE_MISSES = Counter(
    "clickscore_model_cache_misses", "events whose session had no usable model state (new worker, "
    "restart, rebalance, model swap, evicted): the window graph rebuilt it", registry=REGISTRY)
CACHE_EVICTIONS = Counter(
    "clickscore_model_cache_evictions", "model states dropped to stay under --model-cache-bytes",
    registry=REGISTRY)
CACHE_TOO_LONG = Counter(
    "clickscore_model_cache_too_long", "events scored by the window graph because their session is "
    "longer than the window (a carried state would remember what the window forgot)", registry=REGISTRY)
CACHE_DEEP = Counter(
    "clickscore_model_cache_deep", "events scored by the window graph because their session already had "
    "MAX_ROUNDS events stepped in the same batch (bounds the step calls per batch)", registry=REGISTRY)
CACHE_BYTES = Gauge(
    "clickscore_model_cache_bytes", "bytes held by the model-state cache (estimate, entries' overhead "
    "included)", registry=REGISTRY)
CACHE_SESSIONS = Gauge(
    "clickscore_model_cache_sessions", "sessions with a model state in the cache", registry=REGISTRY)


def fingerprint(rows: np.ndarray) -> bytes:
    """16 bytes that name a window's rows exactly (blake2b of their bytes)."""
    return hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=FINGERPRINT_BYTES).digest()


@dataclass(slots=True)
class CachedState:
    state: np.ndarray          # (state_size,) float32: the model state after the rows below
    event_count: int           # the session's event count it follows
    fingerprint: bytes         # fingerprint(window rows it was computed from)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + len(self.fingerprint) + ENTRY_OVERHEAD_BYTES


class ModelStateCache:
    """session key -> CachedState, least recently used out past `max_bytes`. Not thread
    safe: one inference thread owns it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, CachedState] = OrderedDict()
        self.nbytes = 0
        self.model = None          # the scorer whose states these are (see bind)
        self.hits = self.misses = self.evictions = self.too_long = self.deep = 0

    def __len__(self) -> int:
        return len(self._entries)

    def bind(self, model: object) -> None:
        """States belong to one model: another one (a hot swap) empties the cache."""
        if model is not self.model:
            if self._entries:
                log.info("model changed: dropping %d cached model states (rebuilt from windows on demand)",
                         len(self._entries))
            self.clear()
            self.model = model

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
        self._publish()

    def get(self, key: bytes, event_count: int, prefix_fingerprint: bytes) -> np.ndarray | None:
        """The state a session's next event steps from, or None: only an entry that follows
        exactly event `event_count` with exactly these rows."""
        entry = self._entries.get(key)
        if entry is None or entry.event_count != event_count or entry.fingerprint != prefix_fingerprint:
            return None
        self._entries.move_to_end(key)
        return entry.state

    def put(self, key: bytes, state: np.ndarray, event_count: int, window_fingerprint: bytes) -> None:
        entry = CachedState(np.array(state, dtype=np.float32, copy=True), event_count, window_fingerprint)
        size = entry.nbytes + len(key)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes + len(key)
        if size > self.max_bytes:
            self._publish()
            return
        self._entries[key] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            dropped_key, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes + len(dropped_key)
            self.evictions += 1
            CACHE_EVICTIONS.inc()

    def drop(self, key: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes + len(key)

    def _publish(self) -> None:
        CACHE_BYTES.set(self.nbytes)
        CACHE_SESSIONS.set(len(self._entries))


# -- scoring a batch through the cache (inference thread) ----------------------------------

WINDOW = "window"     # plan: scored by the window graph
STEP = "step"


@dataclass(slots=True)
class _Plan:
    how: str                     # WINDOW or STEP
    source: object = None        # STEP: None (initial state), np.ndarray (cache entry) or int (position)
    depth: int = 0               # STEP: round in which it can run (1 + its source position's depth)


def score_batch(scorer, cache: ModelStateCache | None, accepted: Sequence[pipeline.Accepted], top_k: int
                ) -> pipeline.Scores:
    """A batch's scores the way the worker serves them: through `cache` when there is one
    and the model has a step graph, else by windows (pipeline.score_isolated). Used by the
    inference thread and by the inference process (stream/inference.py) alike."""
    if cache is not None and scorer.supports_step and accepted:
        return score_cached(scorer, cache, accepted, top_k)
    return pipeline.score_isolated(scorer.score, [a.window for a in accepted], top_k)


def score_cached(scorer, cache: ModelStateCache, accepted: Sequence[pipeline.Accepted], top_k: int
                 ) -> pipeline.Scores:
    """Scores of a batch's accepted events (in batch order) through the cache; equal to
    pipeline.score_isolated(scorer.score, windows, top_k). Updates the cache."""
    cache.bind(scorer)
    windows = [a.window for a in accepted]
    try:
        scores, states, plan = _score(scorer, cache, accepted, windows, top_k)
    except Exception as exc:
        # Narrow a model fault down on the plain path, and carry no state of these sessions.
        log.warning("scoring through the model-state cache raised %s; re-scoring the batch by windows",
                    type(exc).__name__)
        for item in accepted:
            cache.drop(item.key)
        cache._publish()
        return pipeline.score_isolated(scorer.score, windows, top_k)
    # Rows the model answered with non-finite numbers: the plain path decides which fail.
    finite = (np.isfinite(scores.buy_probability) & np.isfinite(scores.top_scores).all(axis=1)
              & (scores.buy_probability >= 0) & (scores.buy_probability <= 1))
    bad = np.flatnonzero(~finite)
    if len(bad):
        redo = pipeline.score_isolated(scorer.score, [windows[i] for i in bad], top_k)
        for j, i in enumerate(bad):
            scores.buy_probability[i] = redo.buy_probability[j]
            scores.top_items[i] = redo.top_items[j]
            scores.top_scores[i] = redo.top_scores[j]
            if j in redo.failed:
                scores.failed[int(i)] = redo.failed[j]
        bad_keys = {accepted[i].key for i in bad}
    else:
        bad_keys = set()
    # Keep each session's newest exact state (later positions overwrite earlier ones).
    last: dict[bytes, int] = {}
    for position, item in enumerate(accepted):
        last[item.key] = position
    for key, position in last.items():
        item = accepted[position]
        state = states[position]
        if (key in bad_keys or item.replayed or not np.isfinite(state).all()
                or plan[position].how == WINDOW and not step_exact([item.window], scorer.artefacts.window)[0]):
            cache.drop(key)
            continue
        cache.put(key, state, item.event_count, fingerprint(item.window))
    cache._publish()
    return scores


def _score(scorer, cache: ModelStateCache, accepted: Sequence[pipeline.Accepted], windows: list,
           top_k: int) -> tuple[pipeline.Scores, np.ndarray, list[_Plan]]:
    n = len(accepted)
    exact = step_exact(windows, scorer.artefacts.window)
    plan: list[_Plan] = []
    newest: dict[bytes, int] = {}            # key -> latest position of it planned so far
    deep = 0
    for position, item in enumerate(accepted):
        window = windows[position]
        previous = newest.get(item.key)
        newest[item.key] = position
        if item.replayed:
            plan.append(_Plan(WINDOW))       # an old view of the session: nothing to step from
            continue
        if not exact[position]:
            plan.append(_Plan(WINDOW))
            cache.too_long += 1
            continue
        if item.event_count == 1:            # a new session: the initial state
            plan.append(_Plan(STEP, None, 1))
            cache.hits += 1
            continue
        source: object = None
        if previous is not None:
            # The same session's previous event in this batch: pipeline.prepare built this
            # window as that one plus one row, so the counts and lengths say it all.
            before = accepted[previous]
            if (before.event_count == item.event_count - 1 and exact[previous]
                    and len(before.window) == len(window) - 1):
                source = previous
        else:
            source = cache.get(item.key, item.event_count - 1, fingerprint(window[:-1]))
        if source is None:
            plan.append(_Plan(WINDOW))
            cache.misses += 1
            CACHE_MISSES.inc()
            continue
        depth = plan[source].depth + 1 if isinstance(source, int) else 1
        if depth > MAX_ROUNDS:
            # Bounds the step calls per batch: a session with many events in one batch has
            # every (MAX_ROUNDS + 1)-th scored in the batched window call, whose state the
            # next ones step from.
            plan.append(_Plan(WINDOW))
            deep += 1
            continue
        plan.append(_Plan(STEP, source, depth))
        cache.hits += 1
    stepped = sum(p.how == STEP for p in plan)
    CACHE_HITS.inc(stepped)
    CACHE_TOO_LONG.inc(sum(1 for p, e, a in zip(plan, exact, accepted) if p.how == WINDOW and not e
                           and not a.replayed))
    CACHE_DEEP.inc(deep)
    cache.deep += deep

    buy = np.full(n, np.nan, dtype=np.float64)
    items = np.zeros((n, top_k), dtype=np.int64)
    top_scores = np.zeros((n, top_k), dtype=np.float32)
    states = np.zeros((n, scorer.state_size), dtype=np.float32)   # (n, state_size), row per position

    def store(positions: list[int], batch, new_states: np.ndarray) -> None:
        rows = np.asarray(positions)
        k = batch.top_items.shape[1]
        buy[rows] = batch.buy_probability
        items[rows, :k] = batch.top_items
        top_scores[rows, :k] = batch.top_scores
        states[rows] = new_states

    # One batched window call for every miss, long session, deep chain and re-delivered event.
    rebuild = [p for p in range(n) if plan[p].how == WINDOW]
    if rebuild:
        batch, new_states = scorer.score_windows_with_state([windows[p] for p in rebuild], top_k)
        store(rebuild, batch, new_states)
    # Then the steps, round by round (a session's r-th chained event in round r).
    rounds: dict[int, list[int]] = {}
    for p in range(n):
        if plan[p].how == STEP:
            rounds.setdefault(plan[p].depth, []).append(p)
    for depth in sorted(rounds):
        positions = rounds[depth]
        before = np.zeros((len(positions), scorer.state_size), dtype=np.float32)   # (B, state_size)
        for j, p in enumerate(positions):
            source = plan[p].source
            if isinstance(source, int):
                before[j] = states[source]
            elif source is not None:
                before[j] = source
        batch, new_states = scorer.score_step([windows[p] for p in positions], before, top_k)
        store(positions, batch, new_states)
    return pipeline.Scores(buy, items, top_scores, {}), states, plan
