"""Recovery reads each changelog to its true end (stream/changelog_ends.py): the embedded
broker reports a partition's end as its last batch's start + 1, so without the probe a
table restored from a changelog whose last write was a batch of several values comes back
without the rest of that batch.

    .venv/bin/python -m pytest tests/test_changelog_ends.py -q
"""
from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workerkit import produce  # noqa: E402
from stream.changelog_ends import probe_ends, true_end  # noqa: E402


def test_true_end_never_goes_below_the_reported_end():
    assert true_end(10, None, None) == 10                 # nothing fetched: keep the broker's figure
    assert true_end(10, 14, None) == 15                   # one past the last record of the last batch
    assert true_end(10, 14, 16) == 16                     # a fetch high watermark above it wins
    assert true_end(10, 5, 3) == 10                       # never below the reported end


def test_probe_finds_the_end_of_a_last_batch_of_several_records(broker):
    from kafka import KafkaConsumer, TopicPartition

    topic = f"ends-{uuid.uuid4().hex[:8]}"
    # One record alone, then 7 in one produce batch (same partition, linger): the last batch.
    produce(broker, topic, [(b"k", b"first")])
    meta = produce(broker, topic, [(b"k", f"v{i}".encode()) for i in range(7)])
    partition = meta[0].partition
    true_last = max(m.offset for m in meta)
    assert true_last == 7
    consumer = KafkaConsumer(bootstrap_servers=broker)
    tp = TopicPartition(topic, partition)
    reported = consumer.end_offsets([tp])[tp]
    consumer.close()
    # What the broker says (on Kafka this would already be 8; here it is the batch's start + 1).
    print(f"reported end {reported}, true end {true_last + 1}")
    assert reported <= true_last + 1
    ends = asyncio.run(probe_ends(broker, {(topic, partition): reported}))
    assert ends[(topic, partition)] == true_last + 1
    # Partitions reported empty are left alone, without a fetch.
    assert asyncio.run(probe_ends(broker, {(topic, partition + 1): 0})) == {(topic, partition + 1): 0}
