"""Benchmark: how long an idle-session scan holds the worker's event loop.

    .venv/bin/python -m bench.eviction
    .venv/bin/python -m bench.eviction --sessions 1000000

Builds --sessions real state values (five events each, session_state.advance, four
partitions), half of them idle at the watermarks, in a dict as the memory store holds
them, and times, as the worker runs them (stream/app.py evict_idle_sessions):
- items_ms + whole_scan_ms: what a scan held the loop for before 2026-12-04: listing the
  table's items, then deciding every session at once (idle_keys);
- keys_ms: listing the keys, all the worker now does at once;
- slice_worst_ms: the longest of the slices of EVICTION_SLICE sessions the worker then
  decides per event-loop turn, reading each value (session_state.idle_now; batches run
  in between).
Both decide the same sessions (checked). Prints one JSON line and appends it to
bench/results/eviction-<date>.json with the machine (bench/record.py).
"""
from __future__ import annotations

import argparse
import time

from bench.record import append_result, machine
from stream.app import EVICTION_SLICE
from stream.events import ClickEvent
from stream.features import FeatureArtefacts
from stream.session_state import advance, idle_keys, idle_now

T0 = 1_767_571_253_772
TIMEOUT_MS = 1_800_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args(argv)
    artefacts = FeatureArtefacts(items=("a", "b"), categories=("x",), dwell_mean=0.0, dwell_std=1.0,
                                 price_mean=0.0, price_std=1.0)
    table: dict[bytes, bytes] = {}
    for s in range(args.sessions):
        state = None
        for i in range(5):
            state = advance(state, ClickEvent(f"s{s}", "view", "ab"[i % 2], T0 + s + i * 1000), artefacts, s % 4, i,
                            TIMEOUT_MS)
        table[f"s{s}".encode()] = state.to_bytes()
    # Half the sessions' last events lie more than the timeout behind the watermarks.
    watermarks = {p: T0 + args.sessions // 2 + 4000 + TIMEOUT_MS for p in range(4)}
    owned = {0, 1, 2, 3}
    start = time.perf_counter()
    items = list(table.items())
    items_s = time.perf_counter() - start
    start = time.perf_counter()
    whole = list(idle_keys(items, watermarks, TIMEOUT_MS, owned))
    whole_s = time.perf_counter() - start
    del items
    start = time.perf_counter()
    keys = list(table)
    keys_s = time.perf_counter() - start
    worst, sliced = 0.0, []
    for first in range(0, len(keys), EVICTION_SLICE):
        start = time.perf_counter()
        sliced += idle_now(keys[first:first + EVICTION_SLICE], table.get, watermarks, TIMEOUT_MS, owned)[0]
        worst = max(worst, time.perf_counter() - start)
    assert sliced == whole, "the sliced scan decided other sessions than the whole scan"
    append_result("eviction", {
        "bench": "eviction", "sessions": args.sessions, "idle": len(whole), "slice": EVICTION_SLICE,
        "items_ms": round(items_s * 1e3, 2), "whole_scan_ms": round(whole_s * 1e3, 2), "keys_ms": round(keys_s * 1e3, 2),
        "slice_worst_ms": round(worst * 1e3, 2), "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
