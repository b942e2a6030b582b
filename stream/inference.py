"""Inference in its own process (`clickscore worker --inference-process`): the model calls
and the model-state cache leave the worker's process, so they no longer share its GIL.

    remote = InferenceProcess(provider="cpu", threads=1, cache_bytes=256 << 20)
    scores, seconds, t0, t1 = remote.score(served, batch.accepted, top_k=20)   # inference thread
    # [Accepted] --(one pipe, pickled)--> python -m stream.inference --(score_cached)--> Scores
    remote.close()

Why it is built this way (docs/operations.md, "What bounds the worker"):
- In one process the event loop (Faust's stream, decode, state, outputs) and the inference
  thread take turns on one GIL: every time the inference thread gives it up around a
  `Session.run` or a large numpy op it waits up to the switch interval to get it back, so
  its wall time per batch was 2-3x its CPU time and the event loop waited on it. Here the
  child has its own interpreter; the worker's inference thread only pickles a batch,
  waits on a pipe (GIL released) and unpickles the scores.
- The worker's inference thread still takes batches one at a time in the order begun, so
  per-session order, the model swap between batches and the commit rule are unchanged.
- The child owns the model-state cache (stream/model_cache.py), exactly as the inference
  thread did. It is only a shortcut (the changelog window stays the source of truth), so
  a child that dies loses nothing: the worker scores that batch itself, starts a new child,
  and the new child rebuilds states from windows on demand (misses).
- The child loads the model the worker's inference thread hands it (by folder): after a
  hot swap the first batch of the new version loads it there (the worker already loaded
  and checked it in the background). The child keeps only the model it serves.
- The child's cache counters come back with every answer and are added to the worker's
  Prometheus counters, so the dashboards read the same series in both modes.
- A subprocess with its own stdin/stdout (length-prefixed pickles), not multiprocessing:
  nothing of the worker's `__main__` (Faust, its threads) is imported or forked into it.
  The child moves its stdout aside at start so a stray print cannot corrupt the protocol.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO, Sequence

import numpy as np
from prometheus_client import Counter

from stream import model_cache, pipeline
from stream.metrics import REGISTRY

log = logging.getLogger("clickscore.worker")

_HEADER = struct.Struct("<Q")
# The child's cache tallies (ModelStateCache attributes), in the order they come back, and
# the worker's counters they are added to (score_cached counts them in the child's registry,
# which nobody scrapes).
_COUNTERS = ("hits", "misses", "evictions", "too_long", "deep")
_COUNTER_METRICS = {"hits": model_cache.CACHE_HITS, "misses": model_cache.CACHE_MISSES,
                    "evictions": model_cache.CACHE_EVICTIONS, "too_long": model_cache.CACHE_TOO_LONG,
                    "deep": model_cache.CACHE_DEEP}

INFERENCE_PROCESS_FAILURES = Counter(
    "clickscore_inference_process_failures", "batches the inference process did not score (it died "
    "meanwhile, or failed outside the model's own guards): the worker scored them itself", registry=REGISTRY)
INFERENCE_PROCESS_STARTS = Counter(
    "clickscore_inference_process_starts", "inference processes started (more than one: a child died "
    "and was replaced; its model states are rebuilt from windows)", registry=REGISTRY)


def _write(stream: BinaryIO, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("inference process closed its pipe")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("inference process closed its pipe mid-answer")
    return pickle.loads(data)


def pack(accepted: Sequence[pipeline.Accepted]) -> tuple:
    """What the child needs of a batch, as few objects as possible: one array of every
    window's rows back to back (pickling 256 small structured arrays costs far more than
    one), their lengths, and per event its session key, event count and replay flag."""
    windows = [a.window for a in accepted]
    rows = np.concatenate(windows) if windows else np.zeros(0)
    lengths = np.fromiter((len(w) for w in windows), dtype=np.int64, count=len(windows))
    return (rows, lengths, [a.key for a in accepted], [a.event_count for a in accepted],
            [a.replayed for a in accepted])


def unpack(packed: tuple) -> list[pipeline.Accepted]:
    """The child's view of a batch: Accepted with what scoring reads (windows are views)."""
    rows, lengths, keys, counts, replayed = packed
    windows = np.split(rows, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return [pipeline.Accepted(i, None, key, window, count, False, False, again)
            for i, (key, window, count, again) in enumerate(zip(keys, windows, counts, replayed))]


class _Child:
    """The child's side: the model it serves and its model-state cache."""

    def __init__(self, provider: str, threads: int, cache_bytes: int):
        self.provider, self.threads = provider, threads
        self.cache = model_cache.ModelStateCache(cache_bytes) if cache_bytes else None
        self.model_token: Any = None
        self.scorer = None

    def score(self, token: Any, model_dir: str, packed: tuple, top_k: int) -> tuple:
        from stream.scoring import ModelScorer
        if token != self.model_token:
            self.scorer = self.model_token = None   # the old model's memory goes before the new one loads
            self.scorer = ModelScorer(model_dir, self.provider, self.threads)
            self.model_token = token
        accepted = unpack(packed)
        t0 = time.perf_counter()
        scores = model_cache.score_batch(self.scorer, self.cache, accepted, top_k)
        t1 = time.perf_counter()
        cache = self.cache
        stats = (tuple(getattr(cache, name) for name in _COUNTERS) + (cache.nbytes, len(cache))
                 if cache is not None else None)
        return scores, t0, t1, stats


def serve(requests: BinaryIO, answers: BinaryIO, provider: str, threads: int, cache_bytes: int) -> None:
    """The child's loop: one request in, one answer out, until the worker closes the pipe.
    An answer is ("ok", scores, t0, t1, stats) or ("error", detail)."""
    child = _Child(provider, threads, cache_bytes)
    logged: set[str] = set()
    while True:
        try:
            request = _read(requests)
        except EOFError:
            return
        try:
            answer = ("ok",) + child.score(*request)
        except Exception as exc:
            # The worker scores this batch itself (and logs the detail); the traceback is
            # logged here once per exception type.
            if type(exc).__name__ not in logged:
                logged.add(type(exc).__name__)
                log.exception("inference process: a batch failed; the worker scores it itself")
            answer = ("error", pipeline._clip(f"{type(exc).__name__}: {exc}"))
        _write(answers, answer)


class InferenceProcess:
    """The worker's side: starts the child, hands it batches (from the one inference thread),
    and scores a batch itself when the child cannot answer (then starts a new child)."""

    def __init__(self, provider: str = "auto", threads: int = 1, cache_bytes: int = 0,
                 fallback_cache: model_cache.ModelStateCache | None = None):
        """`cache_bytes`: the child's model-state cache (0: none). `fallback_cache`: the
        worker's own, for the batches scored here (None: those go by windows)."""
        self.provider, self.threads, self.cache_bytes = provider, threads, cache_bytes
        self._proc: subprocess.Popen | None = None
        self._seen = (0,) * len(_COUNTERS)
        self._lock = threading.Lock()
        self._fallback_cache = fallback_cache
        self.failures = 0
        self.start()
        atexit.register(self.close)    # the child also exits on its own when the pipe closes

    def start(self) -> None:
        cmd = [sys.executable, "-m", "stream.inference", "--provider", self.provider,
               "--threads", str(self.threads), "--cache-bytes", str(self.cache_bytes)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1 << 16)
        self._seen = (0,) * len(_COUNTERS)
        INFERENCE_PROCESS_STARTS.inc()
        log.info("inference process %d started", self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def score(self, served, accepted: Sequence[pipeline.Accepted], top_k: int
              ) -> tuple[pipeline.Scores, float, float]:
        """Scores of `accepted` by `served` (registry.ModelTagged): (scores, t0, t1), t0/t1
        perf_counter() when the model work began and ended (the same clock in both processes)."""
        with self._lock:
            request = ((served.scorer.info.path, served.version, id(served.scorer)),
                       served.scorer.info.path, pack(accepted), top_k)
            try:
                if self._proc is None or self._proc.poll() is not None:
                    if self._proc is not None:
                        log.warning("inference process %d exited (%s); starting a new one",
                                    self._proc.pid, self._proc.returncode)
                    self.start()
                _write(self._proc.stdin, request)
                answer = _read(self._proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                # Died mid-batch (or the pipe broke): this batch is scored here, and the
                # next one goes to a new child.
                answer = ("error", f"{type(exc).__name__}: {exc}")
                self._restart()
            if answer[0] == "ok":
                _, scores, t0, t1, stats = answer
                self._publish(stats)
                return scores, t0, t1
            self.failures += 1
            INFERENCE_PROCESS_FAILURES.inc()
            log.warning("inference process failed (%s); scoring the batch in the worker", answer[1][:300])
        t0 = time.perf_counter()
        scores = model_cache.score_batch(served.scorer, self._fallback_cache, accepted, top_k)
        return scores, t0, time.perf_counter()

    def _publish(self, stats) -> None:
        if stats is None:
            return
        counts, (nbytes, sessions) = stats[:len(_COUNTERS)], stats[len(_COUNTERS):]
        for name, now, before in zip(_COUNTERS, counts, self._seen):
            if now > before:
                _COUNTER_METRICS[name].inc(now - before)
        self._seen = counts
        model_cache.CACHE_BYTES.set(nbytes)
        model_cache.CACHE_SESSIONS.set(sessions)

    def _restart(self) -> None:
        self._kill()
        self.start()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Closes the pipe: the child's loop ends and it exits."""
        with self._lock:
            self._kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clickscore's inference process (started by the worker)")
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s inference[%(process)d] %(levelname)s %(message)s")
    # The protocol owns the real stdout; anything printed goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=1 << 16)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=1 << 16)
    serve(requests, answers, args.provider, args.threads, args.cache_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
