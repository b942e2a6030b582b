"""Model registry and hot swap: `onnx_models/NAME/VERSION/` folders (VERSION a whole number),
each one a folder written by `clickscore export`.

    clickscore export --checkpoint runs/gru --out onnx_models/gru --registry   # writes onnx_models/gru/N+1
    clickscore models onnx_models/gru                                          # versions, validity, served
    clickscore worker --model onnx_models/gru                                  # serves the newest valid one

    source = ModelSource.open("onnx_models/gru", provider="auto", poll_s=10)
    source.start_polling()              # background thread: load and check new versions
    scorer, tag = source.take()         # inference thread, between batches: switch if one is ready

Why it is built this way:
- A new version is loaded and checked (ModelScorer's own checks, plus `compatible` with the
  one serving) in a background thread, so the worker keeps scoring meanwhile; the switch
  is one reference swap that the inference thread makes between two batches, so every
  batch is scored by exactly one model and its outputs carry that model's version.
- A version that fails to load or check is refused: logged, counted
  (clickscore_model_swaps_total{result="refused"}) and remembered (by its folder's
  modification time, so a re-written folder is tried again); the old model keeps serving.
- The model-state cache is bound to a scorer (stream/model_cache.py), so it empties itself
  on the first batch the new model scores; states are rebuilt from windows on demand.
- A plain export folder (model.onnx inside, like onnx_models/default) still works: one
  model, nothing to poll.
- Version folders appear whole: `clickscore export` writes a hidden staging folder and
  renames it into place (hidden and non-numeric names are not versions).
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from stream.metrics import REGISTRY, set_model_info
from stream.scoring import MODEL_FILE, ModelError, ModelScorer

log = logging.getLogger("clickscore.worker")

MODEL_SWAPS = Counter(
    "clickscore_model_swaps", "new model versions found in the registry, by result: swapped (serving it "
    "now) or refused (corrupt, or not compatible with the one serving; the old one keeps serving)",
    ["result"], registry=REGISTRY)

@dataclass(frozen=True)
class ModelTagged:
    """A loaded model and the name/version its outputs carry."""
    scorer: ModelScorer
    name: str
    version: str


@dataclass(frozen=True)
class VersionEntry:
    version: int
    path: Path
    problem: str | None          # None: loads and passes every check


def is_registry(path: str | Path) -> bool:
    """A folder of VERSION subfolders (no model.onnx of its own)."""
    folder = Path(path)
    return folder.is_dir() and not (folder / MODEL_FILE).exists() and bool(version_folders(folder))


def version_folders(folder: Path) -> list[tuple[int, Path]]:
    """(version, path) of every whole-number subfolder, ascending."""
    if not folder.is_dir():
        return []
    found = [(int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found)


def next_version_path(folder: str | Path) -> tuple[Path, int]:
    """Where `clickscore export --registry` writes: the folder of the next version."""
    folder = Path(folder)
    if (folder / MODEL_FILE).exists():
        raise ModelError(f"{folder} is a single model folder (it holds {MODEL_FILE}), not a registry; "
                         f"give a registry folder such as onnx_models/NAME")
    existing = version_folders(folder)
    version = existing[-1][0] + 1 if existing else 1
    return folder / str(version), version


def compatible(serving: ModelScorer, candidate: ModelScorer) -> str | None:
    """Why `candidate` cannot take over from `serving` while the stored sessions stay as they are
    (None: it can)."""
    if candidate.info.window != serving.info.window:
        return f"window {candidate.info.window} events, the serving model's is {serving.info.window}"
    # Another vocabulary is fine: session rows hold hashes of the raw ids (STATE_VERSION 2),
    # which each model maps to its own indices when it encodes a window.
    return None


def load_version(path: Path, provider: str, threads: int = 0) -> ModelScorer:
    return ModelScorer(path, provider=provider, threads=threads)


def list_versions(folder: str | Path, provider: str = "cpu") -> list[VersionEntry]:
    """Every version with its problem (None when valid); loads each one."""
    out = []
    for version, path in version_folders(Path(folder)):
        try:
            load_version(path, provider)
            problem = None
        except ModelError as exc:
            problem = str(exc)
        except Exception as exc:   # a folder nobody foresaw: still listed
            problem = f"{type(exc).__name__}: {exc}"
        out.append(VersionEntry(version, path, problem))
    return out


class ModelSource:
    """The model a worker serves, and (for a registry) the thread that finds new versions."""

    def __init__(self, path: Path, current: ModelTagged, provider: str, poll_s: float,
                 registry: bool, threads: int = 0):
        self.path = path
        self.provider = provider
        self.poll_s = poll_s
        self.registry = registry
        self.threads = threads
        self._current = current
        self._pending: ModelTagged | None = None
        self._lock = threading.Lock()
        self._refused: dict[int, float] = {}   # version -> folder mtime when refused
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, path: str | Path, provider: str = "auto", poll_s: float = 10.0,
             threads: int = 0) -> "ModelSource":
        """A plain export folder, or a registry: its newest valid version (ModelError when none is)."""
        folder = Path(path)
        if not is_registry(folder):
            scorer = load_version(folder, provider, threads)
            return cls(folder, ModelTagged(scorer, scorer.info.name, scorer.info.version), provider, 0.0,
                       False, threads)
        problems = []
        for version, vpath in reversed(version_folders(folder)):
            try:
                scorer = load_version(vpath, provider, threads)
            except ModelError as exc:
                MODEL_SWAPS.labels(result="refused").inc()
                log.error("model %s version %d refused: %s", folder, version, exc)
                problems.append(f"version {version}: {exc}")
                continue
            source = cls(folder, ModelTagged(scorer, folder.name, str(version)), provider, poll_s, True, threads)
            for refused_version, refused_path in version_folders(folder):
                if refused_version > version:
                    source._refused[refused_version] = _mtime(refused_path)
            return source
        raise ModelError(f"{folder}: no valid model version (" + "; ".join(problems) + ")")

    @property
    def current(self) -> ModelTagged:
        return self._current

    def take(self) -> ModelTagged:
        """The model for the next batch (inference thread): switches to a checked new version."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            old = self._current
            self._current = pending
            MODEL_SWAPS.labels(result="swapped").inc()
            set_model_info(pending.name, pending.version, pending.scorer.info.provider)
            log.info("model %s: now serving version %s (was %s)", self.path, pending.version, old.version)
        return self._current

    def poll_once(self) -> ModelTagged | None:
        """Load and check the newest version above the one serving (and not refused before);
        returns it once it is ready to take over. Runs in the polling thread (or a test)."""
        current = self._pending or self._current
        newer = [(v, p) for v, p in version_folders(self.path) if v > int(current.version)]
        for version, path in reversed(newer):
            if self._refused.get(version) == _mtime(path):
                continue
            try:
                scorer = load_version(path, self.provider, self.threads)
                problem = compatible(self._current.scorer, scorer)
            except ModelError as exc:
                problem = str(exc)
            except Exception as exc:   # a corrupt folder may raise anything: refuse it, keep serving
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                self._refused[version] = _mtime(path)
                MODEL_SWAPS.labels(result="refused").inc()
                log.error("model %s version %d refused (version %s keeps serving): %s",
                          self.path, version, self._current.version, problem)
                continue
            ready = ModelTagged(scorer, self.path.name, str(version))
            with self._lock:
                self._pending = ready
            log.info("model %s version %d loaded and checked; switching between batches", self.path, version)
            return ready
        return None

    def start_polling(self) -> None:
        if not self.registry or self.poll_s <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                try:
                    self.poll_once()
                except Exception:   # the poller must never die: the next tick tries again
                    log.exception("checking %s for a new model version failed", self.path)
        self._thread = threading.Thread(target=loop, name="model-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _mtime(path: Path) -> float:
    try:
        return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])
    except OSError:
        return 0.0


def run(args: argparse.Namespace) -> int:
    """`clickscore models PATH`: the versions a registry holds, whether each is valid, and
    the one a worker would serve."""
    folder = Path(args.path)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder: give a registry (onnx_models/NAME) or an export folder")
    if (folder / MODEL_FILE).exists():
        scorer = load_version(folder, "cpu")
        info = scorer.info
        print(f"{folder}: a single model folder (not a registry)")
        print(f"  {info.name} v{info.version} {info.kind} n_items={info.n_items} "
              f"step={'yes' if scorer.supports_step else 'no'}  <- served")
        return 0
    entries = list_versions(folder, "cpu")
    if not entries:
        raise ModelError(f"{folder} holds no VERSION folders (1, 2, ...): write one with "
                         f"`clickscore export --checkpoint CK --out {folder} --registry`")
    served = next((e.version for e in reversed(entries) if e.problem is None), None)
    print(f"{folder}: registry, {len(entries)} version(s)")
    print(f"{'version':>7}  {'valid':5}  detail")
    for entry in entries:
        mark = "  <- served" if entry.version == served else ""
        detail = "ok" if entry.problem is None else entry.problem
        print(f"{entry.version:>7}  {'yes' if entry.problem is None else 'no':5}  {detail}{mark}")
    if served is None:
        print("no valid version: a worker would refuse to start")
        return 1
    return 0
