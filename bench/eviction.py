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
Then the same sessions in a real Faust RocksDB store (four partition databases in a
temporary folder):
- before 2026-12-04 (session 14): rocksdb_keys_ms, Faust's own listing of the keys
  (`list(store.keys())`, each key decoded through the serializer registry), one
  event-loop turn; rocksdb_get_slice_worst_ms, the longest slice decided with the store's
  get (no current event: it searches every partition's database), and the median slice;
  rocksdb_scan_total_ms_before, the whole scan's CPU;
- now (session_state.key_slices: raw keys a slice at a time per partition, values read
  from the key's own partition):
  rocksdb_slice_worst_ms and _median_ms, the event-loop turns, listing a slice and deciding
  it, rocksdb_list_worst_ms the listing part of it; rocksdb_scan_total_ms, the whole scan.
  The worst turns include the garbage collector's pauses (the benchmark holds every
  session in a dict besides the store).
All decide the same sessions (checked). Prints one JSON line and appends it to
bench/results/eviction-<date>.json with the machine (bench/record.py).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.record import append_result, machine
from stream.app import EVICTION_SLICE
from stream.events import ClickEvent
from stream.features import FeatureArtefacts
from stream.session_state import advance, idle_keys, idle_now, key_slices, read_header

T0 = 1_767_571_253_772
TIMEOUT_MS = 1_800_000


def faust_table_store(store_url: str, tabledir: Path, partitions: int = 4):
    """A real Faust table store as the worker builds it (raw keys and values), serving
    `partitions` partitions; writing to and listing its databases needs no broker.
    Returns the store and the changelog partitions it serves."""
    import faust
    from faust.types import TP
    app = faust.App("eviction-bench", broker="kafka://localhost:1", store=store_url, tabledir=tabledir)
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    table = app.Table("sessions", partitions=partitions, key_type=bytes, value_type=bytes, schema=faust.Schema(**raw))
    actives = {TP(table.changelog_topic_name, p) for p in range(partitions)}
    app.assignor.assigned_actives = lambda: actives
    return table.data, actives


def rocksdb_scan(table: dict[bytes, bytes], watermarks, owned) -> tuple[dict, list]:
    """The scan over the same sessions in Faust's RocksDB store, as it was (Faust's listing
    and get) and as it is (session_state.key_slices): its longest event-loop turn and its
    CPU for the whole table."""
    with tempfile.TemporaryDirectory() as tabledir:
        store, _ = faust_table_store("rocksdb://", Path(tabledir))
        for key, value in table.items():
            store._db_for_partition(read_header(value)[2])[key] = value
        started = time.perf_counter()
        keys = list(store.keys())
        faust_keys_s = time.perf_counter() - started
        turns_before = []
        for first in range(0, len(keys), EVICTION_SLICE):
            start = time.perf_counter()
            idle_now(keys[first:first + EVICTION_SLICE], store.get, watermarks, TIMEOUT_MS, owned)
            turns_before.append(time.perf_counter() - start)
        before_s = time.perf_counter() - started
        assert len(keys) == len(table)
        started = time.perf_counter()
        slices, decided, turns, worst_list = key_slices(store, EVICTION_SLICE), [], [], 0.0
        while True:
            start = time.perf_counter()
            keys, current = next(slices, (None, None))
            listed = time.perf_counter()
            if keys is None:
                break
            decided += idle_now(keys, current, watermarks, TIMEOUT_MS, owned)[0]
            turns.append(time.perf_counter() - start)
            worst_list = max(worst_list, listed - start)
        now_s = time.perf_counter() - started
    figures = {"rocksdb_keys_ms": round(faust_keys_s * 1e3, 2),
               "rocksdb_get_slice_worst_ms": round(max(turns_before) * 1e3, 2),
               "rocksdb_get_slice_median_ms": round(statistics.median(turns_before) * 1e3, 2),
               "rocksdb_scan_total_ms_before": round(before_s * 1e3, 2),
               "rocksdb_slice_worst_ms": round(max(turns) * 1e3, 2),
               "rocksdb_slice_median_ms": round(statistics.median(turns) * 1e3, 2),
               "rocksdb_list_worst_ms": round(worst_list * 1e3, 2),
               "rocksdb_scan_total_ms": round(now_s * 1e3, 2)}
    return figures, decided


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
    rocksdb, decided = rocksdb_scan(table, watermarks, owned)
    assert sorted(decided) == sorted(whole), "the RocksDB scan decided other sessions than the whole scan"
    append_result("eviction", {
        "bench": "eviction", "sessions": args.sessions, "idle": len(whole), "slice": EVICTION_SLICE,
        "items_ms": round(items_s * 1e3, 2), "whole_scan_ms": round(whole_s * 1e3, 2), "keys_ms": round(keys_s * 1e3, 2),
        "slice_worst_ms": round(worst * 1e3, 2), **rocksdb, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
