"""ONNX session -> scores. The runtime half of `clickscore export`.

    scorer = ModelScorer("onnx_models/default")
    batch = scorer.score([window_a, window_b], top_k=20)
    batch.buy_probability   # (B,)
    batch.top_items         # (B, k) item indices, best first; scorer.item_ids(...) maps back

Loads `model.onnx` and the `features.json` beside it, refuses a model whose metadata
does not match this code (schema version, window, input/output names, vocabulary
hash) with a message that says what differs, and picks the execution provider:
CUDA when present and usable, CPU otherwise. Offline evaluation and the streaming
worker both score through this class, so their numbers are the same numbers.
Never imports torch.

Incremental scoring (folders exported with a step graph, `model_step.onnx`):

    scorer.supports_step                       # False for folders exported before
    batch, states = scorer.score_windows_with_state(windows, top_k=20)   # rebuild on a cache miss
    batch, states = scorer.score_step(windows, states, top_k=20)         # one new event per session

`windows` are the session windows *after* their newest event was appended; `states`
is one float32 array (B, scorer.state_size), one row per session (scorer.state_nbytes
bytes each; np.stack rows from a per-session cache, keep `states[b]` back): the
model's named states (metadata state_names/state_shapes) flattened and concatenated
in that order. A session's row must be the state after every row of its window but
the last, i.e. what the previous call returned for it (or `initial_states` before
its first event).

Exactness rule: a step equals the window graph only while the window still holds the
whole session (its first row is the session's first event: gap NaN; in the worker,
event_count == len(window)). After the window starts sliding (event W+1 on) the
window graph forgets the oldest events but a carried state never does, so
`score_step` scores those sessions with the window graph instead (and returns the
window's state for them); `step_exact(windows)` says which rows those are, so the
caller can count their share.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from stream.errors import ClickscoreError
from stream.events import SCHEMA_VERSION
from stream.features import (INPUT_NAMES, ITEM_OFFSET, WINDOW, FeatureArtefacts, encode_last_events,
                             encode_windows)

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
STEP_FILE = "model_step.onnx"
FEATURES_FILE = "features.json"
CARD_FILE = "model_card.md"
OUTPUT_NAMES = ("buy_probability", "next_item_scores")
# Written by `clickscore export` since the top-k moved into the graph: only (B, k) indices
# and scores leave the runtime when serving (padding and OOV masked, lower index first on
# ties, k <= metadata top_k_max). Models exported before still load (top-k in numpy).
TOP_K_OUTPUTS = ("top_items", "top_scores")
# Exports since 2026-12-03 take k as an optional input (an initializer holding top_k_max
# that a feed overrides): onnxruntime's TopK costs ~4x more per row for k=100 than for 20.
TOP_K_INPUT = "top_k"
# The step graph takes one event per session: the window inputs without `length`, each (B,).
STEP_INPUT_NAMES = tuple(name for name in INPUT_NAMES if name != "length")
STATE_METADATA = ("graph", "step_graph", "state_names", "state_shapes")
# Must be equal in both graphs of a folder.
SHARED_METADATA = ("schema_version", "window", "model_kind", "model_name", "model_version", "vocab_hash",
                   "n_items", "heads", "top_k_max", "step_graph", "state_names", "state_shapes")
REQUIRED_METADATA = ("schema_version", "window", "model_kind", "model_name", "model_version",
                     "vocab_hash", "heads", "input_names", "output_names", "n_items")


class ModelError(ClickscoreError):
    """A model folder that is missing, corrupt, or built for other code or data."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    kind: str
    window: int
    vocab_hash: str
    n_items: int
    schema_version: int
    provider: str
    path: str


@dataclass(frozen=True)
class ScoreBatch:
    buy_probability: np.ndarray   # (B,) float32
    top_items: np.ndarray         # (B, k) int64 item indices, best first
    top_scores: np.ndarray        # (B, k) float32 next-item scores (logits)


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDA even on machines without a GPU and then logs a loud
    error when asked for it. Look for the CUDA runtime libraries first."""
    for lib in ("libcublasLt.so.13", "libcublasLt.so.12"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def choose_providers(requested: str = "auto") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and _cuda_usable()
    if requested == "cuda":
        if not cuda:
            raise ModelError("execution provider 'cuda' requested but CUDA is not usable here "
                             f"(available: {available}; CUDA libraries found: {_cuda_usable()}); "
                             "use --execution-provider auto or cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if requested == "cpu" or not cuda:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def check_metadata(meta: Mapping[str, str], artefacts: FeatureArtefacts, where: str) -> None:
    """Raise ModelError naming every difference between the model and this code."""
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(f"{where}: metadata lacks {missing}; re-export it with `clickscore export`")
    problems = []
    if meta["schema_version"] != str(SCHEMA_VERSION):
        problems.append(f"schema_version {meta['schema_version']} (this code: {SCHEMA_VERSION})")
    if meta["window"] != str(WINDOW):
        problems.append(f"window {meta['window']} events (this code: {WINDOW})")
    if tuple(meta["input_names"].split(",")) != INPUT_NAMES:
        problems.append(f"input_names {meta['input_names']} (this code: {','.join(INPUT_NAMES)})")
    state_outputs = tuple(new_state_name(n) for n in meta["state_names"].split(",")) if meta.get("state_names") else ()
    allowed = [OUTPUT_NAMES, OUTPUT_NAMES + TOP_K_OUTPUTS]
    if state_outputs:
        allowed = [OUTPUT_NAMES + state_outputs + TOP_K_OUTPUTS]
    if tuple(meta["output_names"].split(",")) not in allowed:
        problems.append(f"output_names {meta['output_names']} (this code: "
                        + " or ".join(",".join(a) for a in allowed) + ")")
    if meta["output_names"].endswith(",".join(TOP_K_OUTPUTS)) and not meta.get("top_k_max", "").isdigit():
        problems.append("output_names has the in-graph top-k but metadata lacks top_k_max")
    if meta["vocab_hash"] != artefacts.vocab_hash:
        problems.append(f"vocab_hash {meta['vocab_hash']} but {FEATURES_FILE} has {artefacts.vocab_hash} "
                        "(the vocabulary beside the model is not the one it was trained with)")
    if meta["n_items"] != str(artefacts.n_items):
        problems.append(f"n_items {meta['n_items']} but {FEATURES_FILE} has {artefacts.n_items}")
    if artefacts.window != WINDOW:
        problems.append(f"{FEATURES_FILE} window {artefacts.window} (this code: {WINDOW})")
    if problems:
        raise ModelError(f"{where} does not match this code: " + "; ".join(problems))


def new_state_name(name: str) -> str:
    """Output name of a state: `hidden` in, `new_hidden` out (both graphs)."""
    return f"new_{name}"


def parse_state_shapes(meta: Mapping[str, str], where: str) -> dict[str, tuple[int, ...]]:
    """metadata state_names 'hidden' + state_shapes '1x96' -> {'hidden': (1, 96)} (per session)."""
    names = meta["state_names"].split(",")
    shapes = meta["state_shapes"].split(",")
    try:
        parsed = [tuple(int(d) for d in shape.split("x")) for shape in shapes]
    except ValueError:
        parsed = None
    if parsed is None or len(names) != len(shapes) or not all(d > 0 for shape in parsed for d in shape):
        raise ModelError(f"{where}: metadata state_shapes {meta['state_shapes']!r} does not give one "
                         f"shape (like 1x96) per state in state_names {meta['state_names']!r}")
    return dict(zip(names, parsed))


def _graph_state_shapes(values, names: Sequence[str]) -> dict[str, tuple]:
    """onnxruntime's NodeArgs -> {name: shape without the batch dimension} for `names`."""
    found = {v.name: tuple(v.shape[1:]) for v in values}
    return {n: found.get(n) for n in names}


def check_step_metadata(step_meta: Mapping[str, str], meta: Mapping[str, str], where: str) -> None:
    """Raise ModelError naming every way the step graph's metadata disagrees with the window graph's."""
    missing = [k for k in (*REQUIRED_METADATA, *STATE_METADATA, "top_k_max") if k not in step_meta]
    if missing:
        raise ModelError(f"{where}: metadata lacks {missing}; re-export the folder with `clickscore export`")
    problems = []
    if step_meta["graph"] != "step":
        problems.append(f"graph {step_meta['graph']!r} (a step graph says 'step')")
    for key in SHARED_METADATA:
        if step_meta.get(key) != meta.get(key):
            problems.append(f"{key} {step_meta.get(key)} but {MODEL_FILE} has {meta.get(key)}")
    names = tuple(step_meta["state_names"].split(","))
    if tuple(step_meta["input_names"].split(",")) != STEP_INPUT_NAMES + names:
        problems.append(f"input_names {step_meta['input_names']} (this code: "
                        f"{','.join(STEP_INPUT_NAMES + names)})")
    want = OUTPUT_NAMES + tuple(new_state_name(n) for n in names) + TOP_K_OUTPUTS
    if tuple(step_meta["output_names"].split(",")) != want:
        problems.append(f"output_names {step_meta['output_names']} (this code: {','.join(want)})")
    if problems:
        raise ModelError(f"{where} does not match the window graph beside it: " + "; ".join(problems)
                         + "; re-export the folder with `clickscore export`")


class ModelScorer:
    """One onnxruntime session, created once, with an explicit provider list (two with
    a step graph: the window graph and the step graph, same providers)."""

    def __init__(self, model_dir: str | Path, provider: str = "auto", threads: int = 0):
        import onnxruntime as ort

        folder = Path(model_dir)
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise ModelError(f"{model_path} not found: --model must be a folder written by "
                             "`clickscore export` (model.onnx, features.json, model_card.md)")
        self.artefacts = FeatureArtefacts.load(folder / FEATURES_FILE)

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3   # keep CPU-only machines' logs clean
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                                providers=choose_providers(provider))
        except ModelError:
            raise
        except Exception as exc:  # onnxruntime raises several types for a corrupt file
            raise ModelError(f"{model_path} is not a loadable ONNX model: {exc}") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        check_metadata(meta, self.artefacts, str(model_path))
        # The provider actually in use, not the one asked for.
        used = self.session.get_providers()[0]
        self.info = ModelInfo(
            name=meta["model_name"], version=meta["model_version"], kind=meta["model_kind"],
            window=int(meta["window"]), vocab_hash=meta["vocab_hash"], n_items=int(meta["n_items"]),
            schema_version=int(meta["schema_version"]), provider=used, path=str(folder))
        outputs = {o.name for o in self.session.get_outputs()}
        self.top_k_max = int(meta["top_k_max"]) if set(TOP_K_OUTPUTS) <= outputs else 0
        self._takes_k = {MODEL_FILE: _takes_k(self.session)}
        self.step_session = None
        self.state_shapes: dict[str, tuple[int, ...]] = {}
        step_path = folder / STEP_FILE
        if meta.get("step_graph"):
            lacking = [k for k in ("state_names", "state_shapes") if not meta.get(k)]
            if lacking:
                raise ModelError(f"{model_path}: metadata names a step graph but lacks {lacking}; "
                                 "re-export the folder with `clickscore export`")
            if meta["step_graph"] != STEP_FILE or not step_path.is_file():
                raise ModelError(f"{model_path}: metadata step_graph names {meta['step_graph']!r} but "
                                 f"{folder / meta['step_graph']} is missing; copy the whole folder "
                                 "`clickscore export` wrote, or re-export it")
            self._load_step(step_path, meta, options, provider)
        elif step_path.exists():
            raise ModelError(f"{step_path} is there but {model_path} names no step graph (metadata "
                             "step_graph): the two graphs come from different exports; re-export the folder")
        log.info("model %s v%s (%s) on %s", self.info.name, self.info.version, self.info.kind, used)

    def _load_step(self, step_path: Path, meta: Mapping[str, str], options, provider: str) -> None:
        import onnxruntime as ort

        try:
            self.step_session = ort.InferenceSession(str(step_path), sess_options=options,
                                                     providers=choose_providers(provider))
        except Exception as exc:
            raise ModelError(f"{step_path} is not a loadable ONNX model: {exc}") from None
        step_meta = dict(self.step_session.get_modelmeta().custom_metadata_map)
        check_step_metadata(step_meta, meta, str(step_path))
        self.state_shapes = parse_state_shapes(meta, str(step_path.parent / MODEL_FILE))
        # The graphs themselves must have the declared names and shapes, not just say so.
        names = list(self.state_shapes)
        new_names = [new_state_name(n) for n in names]
        declared = {n: self.state_shapes[n] for n in names}
        problems = []
        for label, found in ((f"{STEP_FILE} inputs", _graph_state_shapes(self.step_session.get_inputs(), names)),
                             (f"{STEP_FILE} outputs",
                              _graph_state_shapes(self.step_session.get_outputs(), new_names)),
                             (f"{MODEL_FILE} outputs", _graph_state_shapes(self.session.get_outputs(), new_names))):
            for (name, want), got in zip(declared.items(), found.values()):
                if got != want:
                    problems.append(f"{label}: state {name} is {'absent' if got is None else got}, "
                                    f"metadata says {want}")
        if problems:
            self.step_session = None
            raise ModelError(f"{step_path.parent}: graphs disagree with their metadata: " + "; ".join(problems)
                             + "; re-export the folder with `clickscore export`")
        self._state_sizes = [int(np.prod(shape)) for shape in self.state_shapes.values()]
        self._takes_k[STEP_FILE] = _takes_k(self.step_session)

    # -- running a graph ---------------------------------------------------------------

    @property
    def use_io_binding(self) -> bool:
        """Bind inputs and outputs (onnxruntime IOBinding) instead of session.run: on the CUDA
        provider it saves the per-call feed/fetch marshalling. On by default only there;
        tests switch it on for the CPU provider, where it gives the same numbers."""
        return self._io_binding if self._io_binding is not None else self.info.provider == "CUDAExecutionProvider"

    @use_io_binding.setter
    def use_io_binding(self, value: bool | None) -> None:
        self._io_binding = value

    _io_binding: bool | None = None

    def _fetch(self, session, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """session.run(names, feeds), through an IOBinding when use_io_binding.
        UNTESTED ON A GPU (no CUDA machine was available): outputs are bound to host
        memory, so callers get numpy arrays either way; model state still round-trips
        through the host between batches (keeping it on the device is not done)."""
        if not self.use_io_binding:
            return session.run(list(names), dict(feeds))
        binding = session.io_binding()
        for name, value in feeds.items():
            if name == TOP_K_INPUT:
                # An IOBinding binds graph inputs only, not an overridable initializer: the
                # graph ranks its own top_k_max and the caller keeps the first k.
                continue
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    # -- incremental scoring ---------------------------------------------------------

    @property
    def supports_step(self) -> bool:
        """True when the folder has a step graph (exported since incremental scoring)."""
        return self.step_session is not None

    @property
    def state_size(self) -> int:
        """float32 values of state per session (0 without a step graph)."""
        return sum(self._state_sizes) if self.supports_step else 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of model state per session, as score_step takes and returns it."""
        return 4 * self.state_size

    def initial_states(self, batch_size: int) -> np.ndarray:
        """(B, state_size) zeros: the state before a session's first event."""
        self._need_step()
        return np.zeros((batch_size, self.state_size), dtype=np.float32)

    def _need_step(self) -> None:
        if not self.supports_step:
            raise ModelError(f"{self.info.path} has no step graph ({STEP_FILE}): it was exported before "
                             "incremental scoring; score windows with score(), or re-export it")

    def _pack(self, states: Sequence[np.ndarray]) -> np.ndarray:
        """The graphs' named states, each (B, *shape) -> (B, state_size) float32, one row per session."""
        return np.concatenate([s.reshape(len(s), -1) for s in states], axis=1)

    def _unpack(self, states: np.ndarray) -> dict[str, np.ndarray]:
        """(B, state_size) -> {state name: (B, *shape)}, the step graph's state feeds."""
        B = len(states)
        feeds, start = {}, 0
        for (name, shape), size in zip(self.state_shapes.items(), self._state_sizes):
            feeds[name] = np.ascontiguousarray(states[:, start:start + size]).reshape(B, *shape)
            start += size
        return feeds

    def _check_states(self, states: np.ndarray, batch_size: int) -> np.ndarray:
        states = np.asarray(states)
        if states.shape != (batch_size, self.state_size) or states.dtype != np.float32:
            raise ValueError(f"states must be float32 ({batch_size}, {self.state_size}): one row per window, "
                             f"as score_step/score_windows_with_state return them; got {states.dtype} "
                             f"{states.shape}")
        return states

    def _with_k(self, session, feeds: Mapping[str, np.ndarray], top_k: int) -> Mapping[str, np.ndarray]:
        """feeds, plus k for a graph that takes it, so its TopK ranks only the k asked for."""
        graph = STEP_FILE if session is self.step_session else MODEL_FILE
        if self._takes_k.get(graph):
            return {**feeds, TOP_K_INPUT: np.array([top_k], dtype=np.int64)}
        return feeds

    def _run(self, session, feeds: Mapping[str, np.ndarray], top_k: int) -> tuple[ScoreBatch, np.ndarray]:
        """One run of either graph -> (ScoreBatch, packed new state); fetches only (B, k) when it can."""
        state_outputs = [new_state_name(n) for n in self.state_shapes]
        if top_k <= self.top_k_max:
            buy, items, scores, *states = self._fetch(session, ["buy_probability", *TOP_K_OUTPUTS, *state_outputs],
                                                      self._with_k(session, feeds, top_k))
            return ScoreBatch(buy, items[:, :top_k], scores[:, :top_k]), self._pack(states)
        buy, full, *states = self._fetch(session, ["buy_probability", "next_item_scores", *state_outputs], feeds)
        return ScoreBatch(buy, *top_k_items(full, top_k)), self._pack(states)

    def predict_with_state(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encoded window inputs -> (buy (B,), next_item_scores (B, n_items), states (B, state_size))."""
        self._need_step()
        state_outputs = [new_state_name(n) for n in self.state_shapes]
        buy, scores, *states = self.session.run(["buy_probability", "next_item_scores", *state_outputs],
                                                {name: inputs[name] for name in INPUT_NAMES})
        return buy, scores, self._pack(states)

    def predict_step(self, inputs: Mapping[str, np.ndarray], states: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One encoded event per session (STEP_INPUT_NAMES, each (B,)) and states (B, state_size) ->
        (buy (B,), next_item_scores (B, n_items), new states (B, state_size))."""
        self._need_step()
        states = self._check_states(states, len(inputs["item"]))
        state_outputs = [new_state_name(n) for n in self.state_shapes]
        feeds = {name: inputs[name] for name in STEP_INPUT_NAMES} | self._unpack(states)
        buy, scores, *new = self.step_session.run(["buy_probability", "next_item_scores", *state_outputs], feeds)
        return buy, scores, self._pack(new)

    def score_windows_with_state(self, windows: Sequence[np.ndarray], top_k: int = 20
                                 ) -> tuple[ScoreBatch, np.ndarray]:
        """score() plus each session's state after its window's last row, (B, state_size):
        one batched call rebuilds the states of sessions the caller has no state for."""
        self._need_step()
        inputs = encode_windows(windows, self.artefacts)
        return self._run(self.session, {name: inputs[name] for name in INPUT_NAMES}, top_k)

    def score_step(self, windows: Sequence[np.ndarray], states: np.ndarray, top_k: int = 20
                   ) -> tuple[ScoreBatch, np.ndarray]:
        """Score each window's newest event from the state before it: (ScoreBatch, new states).
        Rows where the window no longer holds the whole session (step_exact False) are scored
        by the window graph instead, so every score equals score(windows)."""
        self._need_step()
        states = self._check_states(states, len(windows))
        exact = step_exact(windows, self.artefacts.window)
        if exact.all():
            return self._step(windows, states, top_k)
        if not exact.any():
            return self.score_windows_with_state(windows, top_k)
        stepped, rewound = np.flatnonzero(exact), np.flatnonzero(~exact)
        parts = [(stepped, *self._step([windows[i] for i in stepped], states[stepped], top_k)),
                 (rewound, *self.score_windows_with_state([windows[i] for i in rewound], top_k))]
        B = len(windows)
        merged = {}
        for field in ("buy_probability", "top_items", "top_scores"):
            sample = getattr(parts[0][1], field)
            merged[field] = np.empty((B, *sample.shape[1:]), dtype=sample.dtype)
            for rows, batch, _ in parts:
                merged[field][rows] = getattr(batch, field)
        new_states = np.empty_like(states)
        for rows, _, part_states in parts:
            new_states[rows] = part_states
        return ScoreBatch(**merged), new_states

    def _step(self, windows: Sequence[np.ndarray], states: np.ndarray, top_k: int) -> tuple[ScoreBatch, np.ndarray]:
        feeds = encode_last_events(windows, self.artefacts) | self._unpack(states)   # (B,) each + states
        return self._run(self.step_session, feeds, top_k)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Encoded inputs -> (buy_probability (B,), next_item_scores (B, n_items))."""
        feeds = {name: inputs[name] for name in INPUT_NAMES}
        buy, scores = self.session.run(list(OUTPUT_NAMES), feeds)
        return buy, scores

    def score(self, windows: Sequence[np.ndarray], top_k: int = 20) -> ScoreBatch:
        """Session windows -> buy probability and the top-k next items (padding/OOV excluded)."""
        inputs = encode_windows(windows, self.artefacts)
        if top_k <= self.top_k_max:
            # (B,) and (B, k_max) leave the runtime, never the (B, n_items) matrix.
            feeds = self._with_k(self.session, {name: inputs[name] for name in INPUT_NAMES}, top_k)
            buy, items, scores = self._fetch(self.session, ["buy_probability", *TOP_K_OUTPUTS], feeds)
            return ScoreBatch(buy, items[:, :top_k], scores[:, :top_k])
        buy, scores = self.predict(inputs)
        return ScoreBatch(buy, *top_k_items(scores, top_k))

    def item_ids(self, indices: np.ndarray) -> list[list[str]]:
        return self.artefacts.item_ids_of(indices)


def _takes_k(session) -> bool:
    """True for a graph whose top-k reads k from the optional TOP_K_INPUT (an overridable
    initializer: onnxruntime lists it there, not among the inputs)."""
    return any(i.name == TOP_K_INPUT for i in session.get_overridable_initializers())


def step_exact(windows: Sequence[np.ndarray], window: int = WINDOW) -> np.ndarray:
    """(B,) bool: True where stepping the carried state gives the window graph's scores,
    i.e. the window still holds the whole session. The first event of a session is the
    only row with an unknown gap (NaN), so a window whose first row has one has dropped
    nothing; once the window slides, its first row has a gap and the rule is False
    (re-run the window). Empty windows are False (nothing to step)."""
    return np.fromiter((0 < len(w) <= window and bool(np.isnan(w["gap"][0])) for w in windows),
                       dtype=bool, count=len(windows))


def top_k_items(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, n_items) scores -> (B, k) indices and scores, best first, never padding or OOV.
    Ties break toward the lower index so every caller ranks identically."""
    real = scores[:, ITEM_OFFSET:]                              # (B, n_items - 2)
    k = min(k, real.shape[1])
    part = np.argpartition(-real, k - 1, axis=1)[:, :k]         # (B, k) unordered
    part_scores = np.take_along_axis(real, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)            # score desc, index asc
    top = np.take_along_axis(part, order, axis=1)
    return top + ITEM_OFFSET, np.take_along_axis(part_scores, order, axis=1)
