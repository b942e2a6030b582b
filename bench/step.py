"""Micro-benchmark: model cost per event, window graph vs step graph, and state bytes.

    .venv/bin/python -m bench.step
    .venv/bin/python -m bench.step --n-items 50000 --batch-sizes 1,16,256 --threads 1

For the GRU and the dilated model at their default configs (GRUConfig / DilatedConfig:
embedding 64, hidden 96; dilated 1..32 x k=3) and a catalogue of --n-items item
indices (default 1,988: the default model's), exports both graphs with the real
export code (training.export: WindowStateScorer, StepScorer, write_onnx; untrained
weights: cost depends on shapes, not values) and times onnxruntime (CPU provider,
--threads intra-op threads) on one batch of B sessions at a time:

- window_us: one window-graph run on B full 100-event windows, fetching what the worker
  fetches (buy probability, in-graph top-k of --top-k), per event (= per window) in microseconds;
- step_us: one step-graph run on B events with their states (and the new states back);
- speedup = window_us / step_us (medians; *_min_us and speedup_min: the fastest
  run, least disturbed on a shared machine); api_*_us: the same through
  ModelScorer.score / score_step, feature encoding and state packing included;
- state_bytes: model state per session (ModelScorer.state_nbytes).

Inputs are random valid indices (the cost does not depend on them). Each figure is
the median over --repeats timed runs after warm-up. Prints one JSON line and appends
it to bench/results/step-<date>.json with the machine (bench/record.py).
Targets (issue 11): speedup at batch 1 >= 30 for the GRU, >= 10 for the dilated model.
With batch 1 measured, floors_b1 records what bounds that speedup (`floors`): onnxruntime's
cost of one call with the step graph's feeds (call_us), the next-item head alone
(head_us), and speedup_bound = window_us / head_us.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.record import append_result, machine
from stream.events import EVENT_TYPES
from stream.features import (EVENT_ROW, INPUT_NAMES, ITEM_OFFSET, WINDOW, FeatureArtefacts, encode_windows,
                             id_hashes, session_rows)
from stream.scoring import (STEP_FILE, STEP_INPUT_NAMES, TOP_K_INPUT, TOP_K_OUTPUTS, ModelScorer,
                            new_state_name)

KINDS = ("gru", "dilated")


def build_folder(kind: str, n_items: int, folder: Path) -> None:
    """A model folder as `clickscore export` writes it (both graphs, metadata, features.json)."""
    import torch

    from stream.events import SCHEMA_VERSION
    from training.export import (HEADS, MIN_OPSET, StepScorer, WindowStateScorer, state_metadata, step_example,
                                 write_onnx)
    from training.models import build_model

    torch.manual_seed(0)
    artefacts = FeatureArtefacts(items=tuple(f"i{i}" for i in range(n_items - ITEM_OFFSET)),
                                 categories=tuple(f"c{i}" for i in range(50)),
                                 dwell_mean=3.0, dwell_std=1.5, price_mean=3.0, price_std=1.0)
    model = build_model(kind, {"n_items": artefacts.n_items, "n_categories": artefacts.n_categories}).eval()
    metadata = {
        "schema_version": str(SCHEMA_VERSION), "window": str(WINDOW), "model_kind": kind, "model_name": "bench",
        "model_version": "1", "vocab_hash": artefacts.vocab_hash, "heads": HEADS, "n_items": str(artefacts.n_items),
        "created": "bench", "graph": "window", "step_graph": STEP_FILE, **state_metadata(model),
    }
    example = encode_windows([random_window(np.random.default_rng(0), artefacts) for _ in range(2)], artefacts)
    folder.mkdir(parents=True, exist_ok=True)
    write_onnx(WindowStateScorer(model).eval(), folder / "model.onnx", example, MIN_OPSET, dict(metadata))
    write_onnx(StepScorer(model).eval(), folder / STEP_FILE, step_example(example, model), MIN_OPSET,
               dict(metadata, graph="step"))
    artefacts.save(folder / "features.json")


def random_window(rng: np.random.Generator, artefacts: FeatureArtefacts, length: int = WINDOW) -> np.ndarray:
    """A full session window of `length` events with valid random items, categories, times, prices."""
    timestamps = 1_700_000_000_000 + np.cumsum(rng.integers(1_000, 120_000, length))
    return session_rows(rng.integers(1, len(EVENT_TYPES) + 1, length),
                        artefacts.item_hashes[rng.integers(0, artefacts.n_items - ITEM_OFFSET, length)],
                        id_hashes(rng.choice(artefacts.categories, length).tolist()), timestamps,
                        rng.uniform(1, 500, length).astype(np.float32))


def timed(call, repeats: int) -> tuple[float, float]:
    """(median, fastest) seconds of `repeats` calls after warm-up. The fastest is the
    least disturbed by other processes on a shared machine; the median is what a
    worker would see under the same load."""
    for _ in range(3):
        call()   # warm-up: first runs allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def measure(folder: Path, batch_sizes: list[int], threads: int, repeats: int, top_k: int) -> dict:
    scorer = ModelScorer(folder, provider="cpu", threads=threads)
    rng = np.random.default_rng(1)
    # Step input: each session's 100th event, i.e. the window graph's last position; the
    # state is whatever the window left (values do not change the cost).
    windows_all = [random_window(rng, scorer.artefacts, WINDOW) for _ in range(max(batch_sizes))]
    assert all(w.dtype == EVENT_ROW for w in windows_all)
    figures = {"state_bytes": scorer.state_nbytes, "batches": {}}
    state_outputs = [new_state_name(n) for n in scorer.state_shapes]
    fetch = ["buy_probability", *TOP_K_OUTPUTS]
    for B in batch_sizes:
        windows = windows_all[:B]
        inputs = encode_windows(windows, scorer.artefacts)
        # k as the worker feeds it (graphs exported since 2026-12-03 take it; older ones rank top_k_max)
        window_feeds = scorer._with_k(scorer.session, {n: inputs[n] for n in INPUT_NAMES}, top_k)
        _, states = scorer.score_windows_with_state(windows, top_k)
        rows = np.arange(B)
        step_feeds = scorer._with_k(scorer.step_session, {n: inputs[n][rows, inputs["length"] - 1]
                                                          for n in STEP_INPUT_NAMES} | scorer._unpack(states), top_k)
        window_s, window_min = timed(lambda: scorer.session.run(fetch, window_feeds), repeats)
        step_s, step_min = timed(lambda: scorer.step_session.run(fetch + state_outputs, step_feeds), repeats)
        api_window_s, _ = timed(lambda: scorer.score(windows, top_k), repeats)
        api_step_s, _ = timed(lambda: scorer.score_step(windows, states, top_k), repeats)
        us = lambda seconds: round(seconds / B * 1e6, 2)   # noqa: E731  per event
        figures["batches"][str(B)] = {
            "window_us": us(window_s), "step_us": us(step_s), "speedup": round(window_s / step_s, 1),
            "window_min_us": us(window_min), "step_min_us": us(step_min),
            "speedup_min": round(window_min / step_min, 1),
            "api_window_us": us(api_window_s), "api_step_us": us(api_step_s),
            "api_speedup": round(api_window_s / api_step_s, 1),
        }
    if 1 in batch_sizes:
        figures["floors_b1"] = floors(scorer, folder, repeats, top_k)
        figures["floors_b1"]["speedup_bound"] = round(
            figures["batches"]["1"]["window_us"] / figures["floors_b1"]["head_us"], 1)
    return figures


def floors(scorer: ModelScorer, folder: Path, repeats: int, top_k: int) -> dict:
    """What bounds the step graph's cost at batch 1, timed like the graphs (medians):
    - call_us: an identity graph with the step graph's inputs and outputs: onnxruntime's
      own cost of one run with these feeds and fetches, before any computing;
    - head_us: the next-item head alone on one event: Gemm against the tied item embedding
      (n_items x E), LogSoftmax, TopK k (the projection to E and the bias left out). An
      exact step must compute it for every event, as the window graph does once per
      window, so window_us / head_us bounds the step's speedup at batch 1 whatever the
      rest of the step costs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    step = onnx.load(str(folder / STEP_FILE))
    inputs = [value for value in step.graph.input if value.name != TOP_K_INPUT]
    outputs = []
    for value in inputs:
        out = onnx.ValueInfoProto()
        out.CopyFrom(value)
        out.name = f"{value.name}_out"
        outputs.append(out)
    identity = helper.make_graph([helper.make_node("Identity", [v.name], [f"{v.name}_out"]) for v in inputs],
                                 "call_floor", inputs, outputs)
    # The head scores against the tied item embedding (n_items, E): its width from the graph,
    # the widest (n_items, .) initializer (the repeat head's per-item buy rate is (n_items, 1)).
    hidden = max(int(t.dims[1]) for t in step.graph.initializer
                 if len(t.dims) == 2 and t.dims[0] == scorer.info.n_items)
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((scorer.info.n_items, hidden)).astype(np.float32), "w"),
               numpy_helper.from_array(np.zeros(scorer.info.n_items, np.float32), "b"),
               numpy_helper.from_array(np.array([top_k], np.int64), "k")]
    head = helper.make_graph(
        [helper.make_node("Gemm", ["h", "w", "b"], ["logits"], transB=1),
         helper.make_node("LogSoftmax", ["logits"], ["log_p"], axis=1),
         helper.make_node("TopK", ["log_p", "k"], ["top_scores", "top_items"], axis=1)],
        "head_floor", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", top_k]),
         helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch", top_k])], weights)

    def session(graph):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = step.ir_version
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    window = random_window(np.random.default_rng(2), scorer.artefacts)
    encoded = encode_windows([window], scorer.artefacts)
    _, states = scorer.score_windows_with_state([window], top_k)
    feeds = {n: encoded[n][:, -1] for n in STEP_INPUT_NAMES} | scorer._unpack(states)
    call, names = session(identity), [v.name for v in outputs]
    call_s, _ = timed(lambda: call.run(names, feeds), repeats)
    head_session, h = session(head), np.zeros((1, hidden), np.float32)
    head_s, _ = timed(lambda: head_session.run(["top_scores", "top_items"], {"h": h}), repeats)
    return {"call_us": round(call_s * 1e6, 2), "head_us": round(head_s * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-items", type=int, default=1988, help="item indices (padding and OOV included)")
    parser.add_argument("--batch-sizes", default="1,16,256", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per figure (median)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result = {"bench": "step", "n_items": args.n_items, "threads": args.threads, "repeats": args.repeats,
              "top_k": args.top_k, "provider": "CPUExecutionProvider", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            folder = Path(tmp) / kind
            build_folder(kind, args.n_items, folder)
            result["models"][kind] = measure(folder, batch_sizes, args.threads, args.repeats, args.top_k)
    result["machine"] = machine()
    append_result("step", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
