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
from stream.features import INPUT_NAMES, ITEM_OFFSET, WINDOW, FeatureArtefacts, encode_windows

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FEATURES_FILE = "features.json"
CARD_FILE = "model_card.md"
OUTPUT_NAMES = ("buy_probability", "next_item_scores")
# Written by `clickscore export` since the top-k moved into the graph: only (B, k) indices
# and scores leave the runtime when serving (padding and OOV masked, lower index first on
# ties, k <= metadata top_k_max). Models exported before still load (top-k in numpy).
TOP_K_OUTPUTS = ("top_items", "top_scores")
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
    if tuple(meta["output_names"].split(",")) not in (OUTPUT_NAMES, OUTPUT_NAMES + TOP_K_OUTPUTS):
        problems.append(f"output_names {meta['output_names']} (this code: {','.join(OUTPUT_NAMES)}"
                        f"[,{','.join(TOP_K_OUTPUTS)}])")
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


class ModelScorer:
    """One onnxruntime session, created once, with an explicit provider list."""

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
        log.info("model %s v%s (%s) on %s", self.info.name, self.info.version, self.info.kind, used)

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
            feeds = {name: inputs[name] for name in INPUT_NAMES}
            buy, items, scores = self.session.run(["buy_probability", *TOP_K_OUTPUTS], feeds)
            return ScoreBatch(buy, items[:, :top_k], scores[:, :top_k])
        buy, scores = self.predict(inputs)
        return ScoreBatch(buy, *top_k_items(scores, top_k))

    def item_ids(self, indices: np.ndarray) -> list[list[str]]:
        return [[self.artefacts.item_id(i) for i in row] for row in indices]


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
