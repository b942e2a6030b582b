"""`clickscore export`: checkpoint folder -> ONNX model folder that ModelScorer serves.

    clickscore export --checkpoint runs/gru --out onnx_models/gru-sim --model-version 2
    clickscore export --checkpoint runs/default --out onnx_models/default --name default \
        --data-command "clickscore simulate --sessions 20000 --seed 0 --out data/sim.parquet"

Writes OUT/model.onnx (legacy TorchScript exporter, dynamo=False: the dynamo exporter
has mis-exported nn.GRU; opset >= 17, batch axis dynamic, W fixed), OUT/features.json
and OUT/model_card.md. The graph is a thin wrapper: the 10 inputs of
stream.features.INPUT_NAMES in, the state read at position length-1, and
`buy_probability` (sigmoid, (B,)) and `next_item_scores` (logits, (B, n_items)) out;
metadata_props as docs/CONTRACTS.md lists them, plus `dataset`.

Incremental scoring: OUT/model_step.onnx, the step graph, takes one event per session
(the 9 feature inputs, each (B,)) and the model state (`hidden` (B, layers, H) for the
GRU, plus `recent_items`, `totals`, `state_mean` when its heads read the window,
training/models/context.py; `cache_0..` (B, H, (k-1)*d) per block for the dilated model) and returns the same
outputs plus the new state (`new_hidden`, `new_cache_0..`). The window graph gains the
same `new_*` outputs: the state after position length-1, so a session whose state is
not cached is rebuilt from its window in one batched call. Both graphs carry the
in-graph top-k and metadata `graph` (window/step), `step_graph`, `state_names` and
`state_shapes` (per session, e.g. `1x96`); stream.scoring refuses a folder whose two
graphs disagree.

Parity check on every export: the eager PyTorch wrapper and stream.scoring.ModelScorer
(onnxruntime, the runtime the worker uses) score the real validation windows the
training run saved (parity_inputs.npz); a max abs difference above --tolerance (1e-5)
on either output fails the export. The step graph is checked the same way: the state
after position length-2 (window graph) stepped by the event at length-1 (step graph)
must give the window graph's scores and state at length-1. The folder is written under a temporary name and
only moved to OUT once it passed, so a failed export leaves no OUT folder behind (and
an existing OUT from an earlier export untouched).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stream.errors import ClickscoreError
from stream.events import SCHEMA_VERSION
from stream.features import INPUT_NAMES, ITEM_OFFSET, WINDOW
from stream.scoring import (CARD_FILE, FEATURES_FILE, MODEL_FILE, OUTPUT_NAMES, STEP_FILE, STEP_INPUT_NAMES,
                            TOP_K_INPUT, TOP_K_OUTPUTS, ModelScorer, new_state_name, top_k_items)
from training.checkpoint import load_checkpoint

PARITY_FILE = "parity_inputs.npz"
LOG_FILE = "train_log.json"
MIN_OPSET = 17
HEADS = "buy,next_item"


class ExportError(ClickscoreError):
    """An export that failed (parity, opset, missing inputs); nothing was written to --out."""


class LastPositionScorer(nn.Module):
    """The served graph: 10 inputs -> (buy_probability (B,), next_item_scores (B, n_items)).

    Reads the causal state at position length-1 *before* the heads, so the next-item
    matmul runs once per window, not once per position.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price, length):
        if hasattr(self.model, "score_last"):   # models whose heads read the window too
            buy_probability, next_item_scores, *_state = self.model.score_last(
                event_type, item, category, hour, weekday, month, week, dwell, price, length)
            return buy_probability, next_item_scores
        hidden = self.model.encode(event_type, item, category, hour, weekday, month, week, dwell, price)  # (B, W, H)
        last = (length - 1).clamp(min=0)                                   # (B,); empty window reads position 0
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.size(2))         # (B, 1, H)
        state = hidden.gather(1, index).squeeze(1)                         # (B, H)
        buy_probability = torch.sigmoid(self.model.heads.buy_logit(state))  # (B,)
        next_item_scores = self.model.heads.next_item_logits(state)         # (B, n_items)
        return buy_probability, next_item_scores


class WindowStateScorer(nn.Module):
    """The served window graph since incremental scoring: LastPositionScorer's outputs and
    the step state after position length-1, (buy (B,), scores (B, n_items), *new_state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = INPUT_NAMES
        self.output_names = OUTPUT_NAMES + tuple(new_state_name(n) for n in model.state_names)

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price, length):
        if hasattr(self.model, "score_last"):   # (buy (B,), scores (B, n_items), *state)
            return self.model.score_last(event_type, item, category, hour, weekday, month, week, dwell, price,
                                         length)
        hidden, state = self.model.encode_with_state(event_type, item, category, hour, weekday, month, week,
                                                     dwell, price, length)              # (B, W, H), states
        last = (length - 1).clamp(min=0)                                   # (B,); empty window reads position 0
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.size(2))         # (B, 1, H)
        final = hidden.gather(1, index).squeeze(1)                         # (B, H)
        return (torch.sigmoid(self.model.heads.buy_logit(final)), self.model.heads.next_item_logits(final),
                *state)


class StepScorer(nn.Module):
    """The step graph: one event's 9 inputs (B,) and the state in -> (buy_probability (B,),
    next_item_scores (B, n_items), *new_state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = STEP_INPUT_NAMES + tuple(model.state_names)
        self.output_names = OUTPUT_NAMES + tuple(new_state_name(n) for n in model.state_names)

    def forward(self, event_type, item, category, hour, weekday, month, week, dwell, price, *state):
        buy_logit, next_item_logits, new_state = self.model.step(
            event_type, item, category, hour, weekday, month, week, dwell, price, state)
        return (torch.sigmoid(buy_logit), next_item_logits, *new_state)


def state_metadata(model: nn.Module) -> dict[str, str]:
    """`state_names` and `state_shapes` (per session, batch left out: '1x96,..') as both graphs carry them."""
    shapes = model.state_shapes()
    return {"state_names": ",".join(model.state_names),
            "state_shapes": ",".join("x".join(str(d) for d in shapes[n]) for n in model.state_names)}


def step_example(inputs: dict[str, np.ndarray], model: nn.Module) -> dict[str, np.ndarray]:
    """Example feeds for tracing the step graph: each window's last event and a zero state."""
    rows = np.arange(len(inputs["length"]))
    last = np.maximum(inputs["length"] - 1, 0)
    example = {name: inputs[name][rows, last] for name in STEP_INPUT_NAMES}     # (B, W) -> (B,)
    for name, tensor in zip(model.state_names, model.initial_state(len(rows))):
        example[name] = tensor.numpy()
    return example


def check_step_parity(model_dir: str | Path, inputs: dict[str, np.ndarray], tolerance: float = 1e-5,
                      batch_size: int = 128) -> dict[str, float]:
    """Through onnxruntime: the window graph's state after position length-2, stepped by
    the event at length-1, against the window graph at length-1 (scores and state).
    Max |diff| per output; raises ExportError above tolerance."""
    scorer = ModelScorer(model_dir, provider="cpu")
    diffs = {"buy_probability": 0.0, "next_item_scores": 0.0, "state": 0.0}
    n = len(inputs["length"])
    for i in range(0, n, batch_size):
        chunk = {k: v[i:i + batch_size] for k, v in inputs.items()}
        length = chunk["length"]
        rows = np.arange(len(length))
        before = dict(chunk, length=np.maximum(length - 1, 0))   # causal: the row at length-1 is not read
        _, _, state = scorer.predict_with_state(before)
        event = {name: chunk[name][rows, np.maximum(length - 1, 0)] for name in STEP_INPUT_NAMES}   # (B,)
        step_buy, step_scores, step_state = scorer.predict_step(event, state)
        buy, scores, window_state = scorer.predict_with_state(chunk)
        for key, a, b in (("buy_probability", step_buy, buy), ("next_item_scores", step_scores, scores),
                          ("state", step_state, window_state)):
            diffs[key] = max(diffs[key], float(np.max(np.abs(a - b))))
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise ExportError("step parity check failed: the step graph and the window graph differ by "
                          + ", ".join(f"{k} max |diff| {v:.3g}" for k, v in bad.items())
                          + f" on {n} real validation windows (tolerance {tolerance:g})")
    diffs["windows"] = n
    return diffs


def load_parity_inputs(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ExportError(f"{path} not found: the checkpoint folder must hold the real validation "
                          "windows `clickscore train` saves for the parity check")
    with np.load(path) as data:
        missing = [n for n in INPUT_NAMES if n not in data]
        if missing:
            raise ExportError(f"{path} lacks inputs {missing}")
        return {n: data[n] for n in INPUT_NAMES}


@torch.no_grad()
def eager_outputs(wrapper: nn.Module, inputs: dict[str, np.ndarray], batch_size: int = 128):
    wrapper.eval()
    buys, scores = [], []
    n = len(inputs["length"])
    for i in range(0, n, batch_size):
        buy, score, *_ = wrapper(*(torch.from_numpy(inputs[name][i:i + batch_size]) for name in INPUT_NAMES))
        buys.append(buy.numpy())
        scores.append(score.numpy())
    return np.concatenate(buys), np.concatenate(scores)


def check_parity(wrapper: nn.Module, model_dir: str | Path, inputs: dict[str, np.ndarray],
                 tolerance: float = 1e-5) -> dict[str, float]:
    """Max |eager - onnxruntime| per output on `inputs`; raises ExportError above tolerance."""
    scorer = ModelScorer(model_dir, provider="cpu")
    torch_buy, torch_scores = eager_outputs(wrapper, inputs)
    ort_buy, ort_scores = [], []
    n = len(inputs["length"])
    for i in range(0, n, 128):
        buy, score = scorer.predict({k: v[i:i + 128] for k, v in inputs.items()})
        ort_buy.append(buy)
        ort_scores.append(score)
    diffs = {"buy_probability": float(np.max(np.abs(np.concatenate(ort_buy) - torch_buy))),
             "next_item_scores": float(np.max(np.abs(np.concatenate(ort_scores) - torch_scores))),
             "windows": n}
    if scorer.top_k_max:
        # The in-graph top-k against the eager scores ranked in numpy: same scores; the
        # same items wherever the scores are not within the tolerance of a tie.
        k = scorer.top_k_max
        want_items, want_scores = top_k_items(torch_scores, k)
        got_items, got_scores = [], []
        for i in range(0, n, 128):
            feeds = {name: inputs[name][i:i + 128] for name in INPUT_NAMES}
            _, items, top = scorer.session.run(["buy_probability", *TOP_K_OUTPUTS], feeds)
            got_items.append(items)
            got_scores.append(top)
        got_items, got_scores = np.concatenate(got_items), np.concatenate(got_scores)
        diffs["top_scores"] = float(np.max(np.abs(got_scores - want_scores)))
        swapped = got_items != want_items
        if swapped.any() and not np.all(np.abs(got_scores - want_scores)[swapped] <= tolerance):
            diffs["top_scores"] = float("inf")
    bad = {k: v for k, v in diffs.items() if k != "windows" and not v <= tolerance}
    if bad:
        raise ExportError("parity check failed: onnxruntime and PyTorch differ by "
                          + ", ".join(f"{k} max |diff| {v:.3g}" for k, v in bad.items())
                          + f" on {n} real validation windows (tolerance {tolerance:g})")
    return diffs


TOP_K_MAX = 100   # the most next items a worker may ask for (--top-k) from an exported model


def add_top_k(model, k_max: int = TOP_K_MAX):
    """Append the serving top-k to an exported graph: outputs `top_items` (B, k) int64 and
    `top_scores` (B, k) float32 over the real items (padding and OOV sliced off, so never
    chosen), best first; ONNX TopK breaks ties toward the lower index, as top_k_items
    does. The full `next_item_scores` stays an output for offline evaluation, but the
    worker fetches only these. Returns k (<= k_max, and <= the number of real items).

    k is the optional input `top_k` (an initializer holding k that a feed overrides, so a
    caller that does not feed it gets k): the worker feeds the --top-k it serves, and
    onnxruntime's TopK costs ~4x more per row for k=100 than for k=20 (27.4 against 6.4 us
    over 1,988 items at batch 256, issue 11). The first k' of a TopK k are its TopK k'."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    n_items = next(o for o in graph.output if o.name == "next_item_scores").type.tensor_type.shape.dim[1].dim_value
    k = min(k_max, n_items - ITEM_OFFSET) if n_items else k_max
    const = lambda name, values: helper.make_node(   # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    graph.node.extend([
        const("topk_start", [ITEM_OFFSET]), const("topk_end", [2 ** 62]), const("topk_axis", [1]),
        const("topk_offset", [ITEM_OFFSET]),
        helper.make_node("Slice", ["next_item_scores", "topk_start", "topk_end", "topk_axis"], ["real_item_scores"]),
        helper.make_node("TopK", ["real_item_scores", TOP_K_INPUT], ["top_scores", "top_real_items"],
                         axis=1, largest=1, sorted=1),
        helper.make_node("Add", ["top_real_items", "topk_offset"], ["top_items"]),
    ])
    graph.initializer.append(numpy_helper.from_array(np.array([k], dtype=np.int64), TOP_K_INPUT))
    graph.input.append(helper.make_tensor_value_info(TOP_K_INPUT, TensorProto.INT64, [1]))
    graph.output.extend([
        helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch", "k"]),
        helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", "k"]),
    ])
    return k


def declare_state_shapes(model, metadata: dict[str, str]) -> None:
    """Write the per-session state shapes into the graph's state inputs and outputs: the
    exporter leaves some of them symbolic (e.g. after a Concat), and the runtime checks
    the graphs' declared shapes against the metadata."""
    names = metadata["state_names"].split(",")
    shapes = [[int(d) for d in shape.split("x")] for shape in metadata["state_shapes"].split(",")]
    wanted = {}
    for name, shape in zip(names, shapes):
        wanted[name] = wanted[new_state_name(name)] = shape
    for value in (*model.graph.input, *model.graph.output):
        if value.name in wanted:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims[1:], wanted[value.name]):
                dim.Clear()
                dim.dim_value = size


def write_onnx(wrapper: nn.Module, path: Path, example: dict[str, np.ndarray], opset: int,
               metadata: dict[str, str]) -> None:
    """Export `wrapper` (its input_names/output_names; LastPositionScorer's when it has
    none), append the in-graph top-k, write `metadata` (input/output names filled in)."""
    import onnx

    input_names = tuple(getattr(wrapper, "input_names", INPUT_NAMES))
    output_names = tuple(getattr(wrapper, "output_names", OUTPUT_NAMES))
    args = tuple(torch.from_numpy(example[name]) for name in input_names)
    dynamic = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the GRU batch-size warning does not apply: batch is dynamic
        torch.onnx.export(wrapper, args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    graph = onnx.load(str(path))
    if metadata.get("state_shapes"):
        declare_state_shapes(graph, metadata)
    metadata["top_k_max"] = str(add_top_k(graph))
    metadata["input_names"] = ",".join(input_names)
    metadata["output_names"] = ",".join(output_names + TOP_K_OUTPUTS)
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def train_command(args: dict, device: str | None = None) -> str:
    """The `clickscore train` line that reproduces the run, every option explicit
    (`--device auto` pinned to the device it ran on: CPU and CUDA weights differ)."""
    parts = ["clickscore", "train"]
    for key, value in args.items():
        if value is None or key in ("command",):
            continue
        if key == "device" and value == "auto" and device:
            value = device.split(":")[0]
        parts += [_flag(key), str(value)]
    return shlex.join(parts)


def prepare_command(stats: dict, data: str) -> str | None:
    if not stats.get("dataset") or not stats.get("input"):
        return None
    parts = ["clickscore", "prepare", "--dataset", stats["dataset"], "--input", stats["input"], "--out", data]
    if stats.get("split_method") == "random":
        parts += ["--split", "random"]
    # Every option prepare records in stats.json, so the rebuild line makes the same split.
    for key in ("test_days", "valid_days", "session_gap_minutes", "buys", "complete_buys_below",
                "split_seed", "random_split_share"):
        if stats.get(key) is not None:
            parts += [_flag(key), str(stats[key])]
    return shlex.join(parts)


def _metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def model_card(name: str, version: str, info: dict, metadata: dict, log: dict, parity: dict,
               commands: list[str], size_bytes: int, n_params: int) -> str:
    stats = info.get("data_stats") or {}
    splits = stats.get("splits", {})
    best = info.get("best_valid") or {}
    lines = [
        f"# Model card: {name} v{version}",
        "",
        f"- kind: `{info['model_kind']}`, {n_params:,} parameters, model.onnx {size_bytes / 1e6:.2f} MB",
        f"- created: {metadata['created']} (trained {info.get('created', '?')}, torch {info.get('torch')}, "
        f"{info.get('device')}, {info.get('seconds')} s)",
        f"- heads: buy probability (sigmoid) and next-item scores (logits over {metadata['n_items']} "
        "item indices; 0 = padding and 1 = out-of-vocabulary are never recommended)",
        f"- window {WINDOW} events, schema version {SCHEMA_VERSION}, vocab_hash `{metadata['vocab_hash']}`",
        "",
        "## Data",
        "",
        f"- dataset: `{stats.get('dataset', '?')}` (prepared folder `{info.get('data')}`), "
        f"split method: {stats.get('split_method', '?')}",
        "",
        "| split | events | sessions | items | buying sessions | buy share | first event | last event |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in ("train", "valid", "test"):
        s = splits.get(split)
        if s:
            lines.append(f"| {split} | {s['events']:,} | {s['sessions']:,} | {s['items']:,} | "
                         f"{s['buying_sessions']:,} | {s['buy_share']:.4f} | {s['first_event']} | {s['last_event']} |")
    lines += [
        "",
        "Vocabulary and normalisation fitted on the train split only; model selection "
        "(early stopping) on the valid split; the test split is untouched by training.",
        "",
        "## Training",
        "",
        f"- config: `{json.dumps(info['config'])}`",
        f"- epochs run {info.get('epochs')}, best epoch {info.get('best_epoch')}, {info.get('steps')} steps, "
        f"seed {info.get('seed')}, imbalance `{log.get('imbalance')}`"
        + (f" (buy-loss logit shift {log['logit_shift']:.2f}: the served probability is prior-corrected "
           "to the real buy rate)" if log.get("logit_shift") else ""),
        "",
        "## Validation (best epoch; every prefix before the first transaction for buy, "
        "every position with a known next item for next-item)",
        "",
        "| buy ROC AUC | buy PR AUC | buy ECE | buy log loss | next-item Recall@20 | next-item MRR@20 |",
        "|---|---|---|---|---|---|",
        f"| {_metric(best.get('buy_roc_auc'))} | {_metric(best.get('buy_pr_auc'))} | {_metric(best.get('buy_ece'))} "
        f"| {_metric(best.get('buy_log_loss'))} | {_metric(best.get('recall@20'))} | {_metric(best.get('mrr@20'))} |",
        "",
        "Per-epoch figures: train_log.json of the checkpoint folder. Test-split figures: `clickscore evaluate`.",
        "",
        "## Parity (export check)",
        "",
        f"max |PyTorch - onnxruntime| on {parity['windows']} real validation windows: buy_probability "
        f"{parity['buy_probability']:.2e}, next_item_scores {parity['next_item_scores']:.2e} (tolerance "
        f"{parity['tolerance']:g})",
        *(["", f"Step graph (model_step.onnx, state {metadata['state_names']} {metadata['state_shapes']}) "
           f"vs window graph: buy_probability {parity['step']['buy_probability']:.2e}, next_item_scores "
           f"{parity['step']['next_item_scores']:.2e}, state {parity['step']['state']:.2e}"]
          if parity.get("step") else []),
        "",
        "## Rebuild",
        "",
        "```sh",
        *commands,
        "```",
        "",
        "Same seed, same data and `--threads 1` give the same weights on CPU (other thread "
        "counts can change float summation order and the last bits).",
        "",
    ]
    return "\n".join(lines)


def export(checkpoint_dir: str | Path, out: str | Path, name: str | None = None, version: str = "1",
           opset: int = MIN_OPSET, tolerance: float = 1e-5, data_command: str | None = None) -> dict:
    """Export, parity-check and move into place; returns the parity figures.

    data_command: the commands that made the prepared data's input (joined by ' && '),
    listed first in the model card's rebuild section."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is below {MIN_OPSET}")
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    name = name or out.name
    model, artefacts, info = load_checkpoint(checkpoint_dir)
    inputs = load_parity_inputs(checkpoint_dir / PARITY_FILE)
    if inputs["item"].shape[1] != artefacts.window:
        raise ExportError(f"parity inputs are {inputs['item'].shape[1]} events wide, the model's window is "
                          f"{artefacts.window}")
    log_path = checkpoint_dir / LOG_FILE
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    wrapper = WindowStateScorer(model).eval()
    metadata = {
        "schema_version": str(SCHEMA_VERSION), "window": str(artefacts.window),
        "model_kind": info["model_kind"], "model_name": name, "model_version": str(version),
        "vocab_hash": artefacts.vocab_hash, "heads": HEADS, "input_names": ",".join(INPUT_NAMES),
        "output_names": ",".join(OUTPUT_NAMES), "n_items": str(artefacts.n_items),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": str(info.get("dataset") or ""),
        "graph": "window", "step_graph": STEP_FILE, **state_metadata(model),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        example = {k: v[:2] for k, v in inputs.items()}
        write_onnx(wrapper, staging / MODEL_FILE, example, opset, dict(metadata))
        write_onnx(StepScorer(model).eval(), staging / STEP_FILE, step_example(example, model), opset,
                   dict(metadata, graph="step"))
        artefacts.save(staging / FEATURES_FILE)
        parity = check_parity(wrapper, staging, inputs, tolerance)
        parity["step"] = check_step_parity(staging, inputs, tolerance)
        parity["tolerance"] = tolerance
        commands = [c.strip() for c in (data_command or "").split("&&") if c.strip()]
        prepare = prepare_command(info.get("data_stats") or {}, info.get("data", "DATA"))
        if prepare:
            commands.append(prepare)
        commands.append(train_command(info.get("args", {}), info.get("device")))
        export_parts = ["clickscore", "export", "--checkpoint", str(checkpoint_dir), "--out", str(out),
                        "--name", name, "--model-version", str(version)]
        if opset != MIN_OPSET:
            export_parts += ["--opset", str(opset)]
        if data_command:
            export_parts += ["--data-command", data_command]
        commands.append(shlex.join(export_parts))
        n_params = sum(p.numel() for p in model.parameters())
        card = model_card(name, version, info, metadata, log, parity, commands,
                          (staging / MODEL_FILE).stat().st_size, n_params)
        (staging / CARD_FILE).write_text(card)
        previous = out.parent / f".{out.name}.previous-{os.getpid()}"
        if out.exists():
            out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ModelScorer(out, provider="cpu")   # what the worker and evaluation will do
    return parity


def run(args: argparse.Namespace) -> int:
    """CLI entry (stream/cli.py)."""
    from stream import registry

    out, version, name = args.out, args.model_version, args.name
    if getattr(args, "registry", False) or registry.is_registry(out):
        # onnx_models/NAME/VERSION: the next version, named after the registry (stream/registry.py).
        name = name or Path(out).name
        path, number = registry.next_version_path(out)
        out, version = str(path), str(number)
    parity = export(args.checkpoint, out, name, version, args.opset, args.tolerance,
                    args.data_command)
    print(f"exported {out}: parity on {parity['windows']} windows, max |diff| buy "
          f"{parity['buy_probability']:.2e}, next-item {parity['next_item_scores']:.2e}; step vs window: buy "
          f"{parity['step']['buy_probability']:.2e}, next-item {parity['step']['next_item_scores']:.2e}, "
          f"state {parity['step']['state']:.2e}")
    return 0
