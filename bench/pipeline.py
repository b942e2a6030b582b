"""Benchmark: CPU per event of the worker's batch logic, without Kafka or Faust.

    .venv/bin/python -m bench.pipeline
    .venv/bin/python -m bench.pipeline --log yoochoose:../shared/datasets/yoochoose-100k --events 20000
    .venv/bin/python -m bench.pipeline --profile score      # cProfile of one stage, top functions

Drives the three stages `clickscore worker` runs per micro-batch (stream/pipeline.py and
stream/model_cache.py, the code the worker calls) over the first --events events of a log
(simulated, or a real one as bench/stream.py --log reads it), in batches of --batch-size,
with a dict for the session table and the served model (--model, onnx_models/default;
CPU provider, one thread):
- prepare: decode, key check, advance the session state (the table writes' values);
- score: model_cache.score_batch through the model-state cache (step graph, window graph
  for misses, sessions past the window and deep chains);
- finish: output records (buyer-scores, next-items JSON). Marketing triggers are left
  out (they need the worker's trigger table); the worker's `finish` stage includes them.
Each figure is process CPU time (time.process_time) per event, so it is steadier than
wall-clock rates on a shared machine. onnxruntime_us_per_event is the part of `score`
spent inside onnxruntime's run (which releases the GIL); python_us_per_event is the rest
of all three stages: Python that holds the GIL, which the worker's event loop and
inference thread share (docs/operations.md, "The worker's I/O alone"). What the worker
spends beyond these is Kafka and Faust: bench/stream.py records the worker's CPU per
event and that of its I/O alone (bench/io_floor.py). Prints one JSON line and appends it
to bench/results/pipeline-<date>.json with the machine (bench/record.py).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

from bench.record import append_result, machine

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "score", "finish")


def run(events: list, model: Path, batch_size: int, partitions: int = 4, profile: str = "") -> dict:
    from stream import model_cache, pipeline
    from stream.scoring import ModelScorer

    scorer = ModelScorer(model, provider="cpu", threads=1)
    # onnxruntime's own time inside `score` (it releases the GIL while it runs; the rest of
    # the batch logic is Python that holds it): each session's run, timed in place.
    ort_s = [0.0]

    def timed_run(run_graph):
        def run_and_time(*args, **kwargs):
            start = time.process_time()
            try:
                return run_graph(*args, **kwargs)
            finally:
                ort_s[0] += time.process_time() - start
        return run_and_time
    for graph in (scorer.session, scorer.step_session):
        if graph is not None:
            graph.run = timed_run(graph.run)
    cache = model_cache.ModelStateCache(256 << 20)
    table: dict[bytes, bytes] = {}
    topics = pipeline.Topics("buyer-scores", "next-items", "clicks-dlq", "triggers")
    tag = pipeline.ModelTag(scorer.info.name, scorer.info.version)
    # Records as the worker's consumer hands them over: offsets in order per partition.
    next_offset = [0] * partitions
    records = []
    for key, value, _ in events:
        partition = sum(key) % partitions
        records.append(pipeline.Record("clicks", partition, next_offset[partition], key, value, time.time()))
        next_offset[partition] += 1
    cpu = dict.fromkeys(STAGES, 0.0)
    profiler = cProfile.Profile() if profile else None
    scored = dead = 0

    def timed(stage: str, call):
        if stage == profile:
            profiler.enable()
        start = time.process_time()
        out = call()
        cpu[stage] += time.process_time() - start
        if stage == profile:
            profiler.disable()
        return out

    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = timed("prepare", lambda: pipeline.prepare(chunk, table.get, scorer.artefacts, 30 * 60 * 1000,
                                                          1 << 20))
        for key, (value, _index) in batch.state_writes.items():
            table[key] = value
        scores = timed("score", lambda: model_cache.score_batch(scorer, cache, batch.accepted, 20))
        done = timed("finish", lambda: pipeline.finish(batch, scores, topics, scorer.item_ids, tag, None,
                                                       processing_ms=1.0))
        scored += done.scored
        dead += sum(done.dead_lettered.values())
    n = len(records)
    result = {f"{stage}_us_per_event": round(cpu[stage] / n * 1e6, 1) for stage in STAGES}
    result["total_us_per_event"] = round(sum(cpu.values()) / n * 1e6, 1)
    result["onnxruntime_us_per_event"] = round(ort_s[0] / n * 1e6, 1)
    result["python_us_per_event"] = round((sum(cpu.values()) - ort_s[0]) / n * 1e6, 1)
    result.update(scored=scored, dead_lettered=dead, cache={"hits": cache.hits, "misses": cache.misses,
                                                            "too_long": cache.too_long, "deep": cache.deep})
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        result["profile"] = text.getvalue()
    return result


def main(argv: list[str] | None = None) -> int:
    from bench.stream import log_events, past_window_share, simulated_events

    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=150,
                        help="events per micro-batch (the saturated worker's batches on the real log: ~150)")
    parser.add_argument("--log", default="", help="DATASET:PATH of a real log (as bench/stream.py --log)")
    parser.add_argument("--model", default=str(REPO / "onnx_models" / "default"))
    parser.add_argument("--profile", default="", choices=("", *STAGES), help="cProfile this stage")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clickscore-bench-") as tmp:
        events = log_events(args.events, Path(tmp), args.log) if args.log else simulated_events(args.events, Path(tmp))
    figures = run(events, Path(args.model), args.batch_size, profile=args.profile)
    profile = figures.pop("profile", None)
    result = {"bench": "pipeline", "events": len(events), "log": args.log or "simulated (clickscore simulate, seed 21)",
              "past_window_share": round(past_window_share(events), 4), "batch_size": args.batch_size,
              "model": args.model, **figures, "machine": machine()}
    append_result("pipeline", result)
    if profile:
        print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
