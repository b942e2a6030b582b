"""Micro-batching without waiting: pipeline.batch_ready (the pure rule), the worker's
take_batches driven without Faust, and the worker on the real broker: an idle worker scores an event as soon as it is fetched,
not after --batch-wait-s, and reports where the time went (clickscore_stage_seconds)."""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from stream import metrics
from stream.app import take_batches
from stream.pipeline import batch_ready

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ is not an installed package

from bench.workerkit import WorkerProcess, produce, read_topic  # noqa: E402
from conftest import free_port  # noqa: E402


def test_an_event_in_hand_goes_at_once_when_nothing_more_was_fetched():
    assert batch_ready(1, 256, upstream_empty=True, waited_s=0.0, within_s=10.0)


def test_a_linger_holds_a_lone_event_for_company_until_it_has_passed():
    assert not batch_ready(1, 256, upstream_empty=True, waited_s=0.004, within_s=0.02, linger_s=0.005)
    assert batch_ready(1, 256, upstream_empty=True, waited_s=0.005, within_s=0.02, linger_s=0.005)


def test_fetched_events_join_the_batch_until_the_window_is_spent():
    assert not batch_ready(5, 256, upstream_empty=False, waited_s=0.001, within_s=0.01)
    assert batch_ready(5, 256, upstream_empty=False, waited_s=0.01, within_s=0.01)


def test_a_full_batch_goes_and_an_empty_one_never_does():
    assert batch_ready(256, 256, upstream_empty=False, waited_s=0.0, within_s=10.0)
    assert not batch_ready(0, 256, upstream_empty=True, waited_s=100.0, within_s=0.0)


@given(buffered=st.integers(0, 600), max_events=st.integers(1, 512), upstream_empty=st.booleans(),
       waited_s=st.floats(0, 1), within_s=st.floats(0, 1), linger_s=st.floats(0, 1))
def test_batch_ready_is_full_or_nonempty_and_not_worth_waiting(buffered, max_events, upstream_empty,
                                                                waited_s, within_s, linger_s):
    expected = buffered >= max_events or (buffered > 0 and ((upstream_empty and waited_s >= linger_s)
                                                             or waited_s >= within_s))
    assert batch_ready(buffered, max_events, upstream_empty, waited_s, within_s, linger_s) == expected
    if buffered and upstream_empty and not linger_s:
        assert batch_ready(buffered, max_events, upstream_empty, waited_s, within_s, linger_s)


def stage_counts(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'clickscore_stage_seconds_count{stage="([^"]+)"} (\S+)', text)}


def test_an_idle_worker_scores_each_event_without_waiting_for_the_batch_window(broker, model_dir, tmp_path):
    # Faust's noack_take would hold each lone event for the whole --batch-wait-s (600 s
    # here); take_batches hands it over as soon as nothing more is waiting.
    run = uuid.uuid4().hex[:8]
    t = {name: f"{name}-{run}" for name in ("input", "scores", "next_items", "dlq", "triggers")}
    metrics_port = free_port()
    with WorkerProcess(broker, model_dir, t, f"app-{run}", tmp_path / "worker.log", free_port(),
                       ["--batch-wait-s", "600", "--metrics-port", str(metrics_port)]) as worker:
        deadline = time.monotonic() + 90
        while "Worker ready" not in worker.log() and "[^Worker]: Ready" not in worker.log():
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.2)
        for i in range(3):   # one at a time: each must come out before the next goes in
            event = {"session_id": f"s{i}", "event_type": "view", "item_id": "1",
                     "timestamp": 1_700_000_000_000 + i, "event_id": f"e{i}"}
            produce(broker, t["input"], [(event["session_id"].encode(), json.dumps(event).encode())])
            outputs = read_topic(broker, t["next_items"], lambda r: len(r) >= i + 1, timeout=60, settle=0)
            assert [json.loads(r.value)["event_id"] for r in outputs] == [f"e{j}" for j in range(i + 1)]
        counts = stage_counts(metrics_port)
        assert worker.proc.poll() is None, worker.log()[-3000:]
    assert set(counts) == set(metrics.STAGES)
    assert counts["consume"] == counts["batch_fill"] == 3          # per event
    assert all(counts[s] == 3 for s in metrics.STAGES)              # one event per batch: per batch too


# -- take_batches: the worker's batching over the queue Faust's consumer fills, no Faust --

def ThrowingQueue():
    """The queue Faust gives a channel (mode's ThrowableQueue: errors thrown into it are
    raised by get/get_nowait), unbounded here."""
    return ThrowableQueue(maxsize=0, flow_control=FlowControlEvent())


def event(n: int, stale: bool = False):
    return SimpleNamespace(n=n, stale=stale, message=SimpleNamespace(timestamp=time.time()))


def admit_fresh(ev) -> bool:
    return not ev.stale


async def batches_of(queue, n_batches: int, max_events: int, within_s: float = 600.0, linger_s: float = 0.0,
                     admit=admit_fresh, stop=lambda: False):
    out = []
    async for batch in take_batches(queue, admit, stop, max_events, within_s, linger_s):
        out.append([ev.n for ev in batch])
        if len(out) == n_batches:
            break
    return out


def test_what_was_fetched_goes_in_full_batches_in_order_without_waiting_for_the_window():
    async def run():
        queue = ThrowingQueue()
        for i in range(10):
            queue.put_nowait(event(i))
        started = time.perf_counter()
        got = await batches_of(queue, 3, max_events=4)
        return got, time.perf_counter() - started
    got, seconds = asyncio.run(run())
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert seconds < 5.0              # within_s is 600: the last, short batch did not wait for it


def test_a_lone_event_goes_at_once_and_a_linger_gathers_what_arrives_meanwhile():
    async def run(linger_s: float):
        queue = ThrowingQueue()

        async def later():
            await asyncio.sleep(0.05)
            queue.put_nowait(event(1))
        queue.put_nowait(event(0))
        feeder = asyncio.ensure_future(later())
        got = await batches_of(queue, 1 if linger_s else 2, max_events=256, linger_s=linger_s)
        await feeder
        return got
    assert asyncio.run(run(0.0)) == [[0], [1]]
    assert asyncio.run(run(1.0)) == [[0, 1]]


def test_stale_events_are_left_out_and_a_batch_of_only_stale_ones_is_never_handed_over():
    async def run():
        queue = ThrowingQueue()
        for i in range(3):
            queue.put_nowait(event(i, stale=True))
        seen = []

        def admit(ev):
            seen.append(ev.n)
            return not ev.stale

        async def later():
            await asyncio.sleep(0.05)
            queue.put_nowait(event(3))
        feeder = asyncio.ensure_future(later())
        got = await batches_of(queue, 1, max_events=2, admit=admit)
        await feeder
        return got, seen
    got, seen = asyncio.run(run())
    assert got == [[3]]
    assert seen == [0, 1, 2, 3]       # each event offered to admit exactly once


def test_an_error_thrown_into_the_channel_is_raised_and_should_stop_ends_the_batches():
    async def thrown():
        queue = ThrowingQueue()
        queue.put_nowait(event(0))
        queue._errors.append(ValueError("thrown"))
        return await batches_of(queue, 1, max_events=4)
    with pytest.raises(ValueError, match="thrown"):
        asyncio.run(thrown())

    async def stopped():
        queue = ThrowingQueue()
        queue.put_nowait(event(0))
        return await batches_of(queue, 5, max_events=4, stop=lambda: True)
    assert asyncio.run(stopped()) == []


def test_the_end_of_the_channel_ends_the_batches_whether_waiting_or_draining():
    # Faust ends a channel on shutdown by throwing StopAsyncIteration into its queue.
    async def run(first_events: int):
        queue = ThrowingQueue()
        for i in range(first_events):
            queue.put_nowait(event(i))

        async def later():
            await asyncio.sleep(0.05)
            queue._throw(StopAsyncIteration())
        feeder = asyncio.ensure_future(later())
        got = await batches_of(queue, 5, max_events=4, linger_s=1.0)
        await feeder
        return got
    assert asyncio.run(run(0)) == []            # thrown while waiting for the first event
    assert asyncio.run(run(2)) == []            # thrown while lingering: the unfinished batch was never handed over


@settings(max_examples=60, deadline=None)
@given(stale=st.lists(st.booleans(), max_size=40), max_events=st.integers(1, 9))
def test_batches_hold_every_admitted_event_once_in_order_and_never_more_than_max(stale, max_events):
    fresh = [i for i, s in enumerate(stale) if not s]

    async def run():
        queue = ThrowingQueue()
        for i, s in enumerate(stale):
            queue.put_nowait(event(i, s))
        out = []
        if not fresh:
            return out
        async for batch in take_batches(queue, admit_fresh, lambda: False, max_events, 600.0):
            out.append([ev.n for ev in batch])
            if sum(map(len, out)) == len(fresh):
                break
        return out
    got = asyncio.run(run())
    assert [n for batch in got for n in batch] == fresh
    assert all(0 < len(batch) <= max_events for batch in got)


def test_admitter_leaves_events_from_before_a_rebalance_out_unacked_and_tracks_the_rest():
    from stream.app import admitter

    class FlowControl:
        active = True

        def is_active(self):
            return self.active

    seen_in = []
    app = SimpleNamespace(consumer=SimpleNamespace(unacked=set()), topics=SimpleNamespace(acking_topics={"in"}),
                          flow_control=FlowControl(), consumer_generation_id=2,
                          sensors=SimpleNamespace(on_message_in=lambda tp, offset, m: seen_in.append(offset)))

    class Message(SimpleNamespace):
        __hash__ = object.__hash__                                # set members, as Faust's are

    def ev(offset, generation):
        message = Message(topic="in", tp=("in", 0), offset=offset, generation_id=generation,
                          tracked=False, acked=False)
        return SimpleNamespace(message=message, ack=lambda: pytest.fail("a stale event was acked"))
    admit = admitter(app)
    old, fresh = ev(1, 1), ev(2, 2)
    assert not admit(old) and not old.message.tracked            # older generation: re-read later
    assert admit(fresh) and fresh.message.tracked and fresh.message in app.consumer.unacked
    app.flow_control.active = False                               # mid-rebalance
    assert not admit(ev(3, 2))
    assert seen_in == [2]
