"""The worker's Kafka I/O alone: the most events/s any worker that writes what ours writes
can reach through Faust and aiokafka on this broker and machine (bench/stream.py runs it).

    .venv/bin/python -m bench.io_floor BROKER SOURCE SINK_PREFIX SCORES_BYTES NEXT_ITEMS_BYTES PORT N OUT

A Faust agent on the input topic that takes events exactly as `clickscore worker` does
(stream/app.py take_batches, admitter, ack_event after delivery) and, per micro-batch,
sends what the worker would send for those events, as one aiokafka record batch per
topic-partition (kafka_compat.batch_sender, the worker's --batch-sends path):
- a next-items record of NEXT_ITEMS_BYTES for every event;
- a buyer-scores record of SCORES_BYTES for every event until its session's first
  transaction (the worker stops scoring buy intent there);
- one changelog record per session of the batch, of the size of the worker's state value
  for it (session_state: 26 + 41 bytes per kept row, at most the 100-event window here).
It decodes nothing, keeps no state but a count per session, and scores nothing. Every
cost it has, the worker has too (the worker's changelog writes are even dearer: one
producer.send per session through Faust's table), so its events/s bounds the worker's
from above, and floor / pass-through and floor / consume-only bound the worker's ratios.
Sink topics: SINK_PREFIX-scores, -next-items, -changelog. Writes to OUT (JSON) its own CPU
seconds (process_time: all threads) from its N/10-th to its 9N/10-th event, and that
count, so bench/stream.py can set its CPU per event beside the worker's.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from stream.features import WINDOW
from stream.session_state import HEADER_SIZE, ROW_BYTES

TRANSACTION = b'"transaction"'


def state_bytes(rows: int) -> int:
    """A session's state value with `rows` kept rows (stream/session_state.py layout)."""
    return HEADER_SIZE + ROW_BYTES * min(rows, WINDOW)


def floor_main(broker: str, source: str, prefix: str, scores_bytes: int, next_items_bytes: int, web_port: int,
               n: int, out_path: str) -> None:
    import faust

    from bench.stream import baseline_app
    from stream import kafka_compat
    from stream.app import ack_event, admitter, take_batches
    from stream.pipeline import Output

    app, raw = baseline_app("iofloor", broker, web_port)
    source_topic = app.topic(source, **raw)
    topics = {name: f"{prefix}-{name}" for name in ("scores", "next-items", "changelog")}
    send_all = kafka_compat.batch_sender(lambda: app.producer)
    counts: dict[bytes, int] = {}
    bought: set[bytes] = set()
    scores_value, next_value = b"s" * scores_bytes, b"n" * next_items_bytes
    # CPU between the n/10-th and the 9n/10-th event: start-up and the tail left out
    meter = {"seen": 0, "from": n // 10, "to": 9 * n // 10, "cpu0": 0.0}

    @app.agent(source_topic)
    async def floor(stream):
        queue = aiter(stream.channel).queue
        async for events in take_batches(queue, admitter(app), lambda: stream.should_stop, 256, 0.01, 0.01):
            outputs, touched = [], set()
            for index, event in enumerate(events):
                key, value = event.message.key, event.message.value
                counts[key] = counts.get(key, 0) + 1
                touched.add(key)
                if key not in bought:
                    outputs.append(Output(topics["scores"], key, scores_value, index))
                    if TRANSACTION in value:
                        bought.add(key)
                outputs.append(Output(topics["next-items"], key, next_value, index))
            for key in touched:
                outputs.append(Output(topics["changelog"], key, b"c" * state_bytes(counts[key]), 0))
            await asyncio.gather(*await send_all(outputs))
            for event in events:
                ack_event(app, event)
            before, meter["seen"] = meter["seen"], meter["seen"] + len(events)
            if before < meter["from"] <= meter["seen"]:
                meter.update(cpu0=time.process_time(), seen0=meter["seen"])
            if before < meter["to"] <= meter["seen"]:
                Path(out_path).write_text(json.dumps({"events": meter["seen"] - meter["seen0"],
                                                      "cpu_s": time.process_time() - meter["cpu0"]}))

    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    broker, source, prefix, scores_bytes, next_items_bytes, port, n, out = sys.argv[1:9]
    floor_main(broker, source, prefix, int(scores_bytes), int(next_items_bytes), int(port), int(n), out)
