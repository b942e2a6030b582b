"""Paired session bootstrap of next-item Recall@20 / MRR@20 differences, model - SKNN,
on the test split of a prepared folder (used for docs/results.md).

    .venv/bin/python -m bench.paired_vs_sknn DATA_DIR {train|train+valid} MODEL_DIR [MODEL_DIR ...]

SKNN is fitted on the named splits; each model is scored through the same evaluation
code as `clickscore evaluate`. Whole test sessions are resampled (1000 times, seed 0),
so model and SKNN are compared on the same prefixes in every resample.
"""
from __future__ import annotations

import sys

import numpy as np
import polars as pl

from training.baselines import ItemCatalogue, SessionKNN
from training.evaluate import Sessions, load_model, load_prepared, score_model

K = 20
RESAMPLES = 1000


def hits_and_reciprocal_ranks(ranks) -> tuple[np.ndarray, np.ndarray]:
    ranks = np.asarray(ranks, dtype=float)
    hit = (ranks >= 1) & (ranks <= K)
    return hit.astype(float), np.where(hit, 1.0 / np.where(hit, ranks, 1), 0.0)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("train", "train+valid"):
        print(__doc__, file=sys.stderr)
        return 2
    data, fit, models = argv[0], argv[1], argv[2:]
    events, _ = load_prepared(data)
    test = events.filter(pl.col("split") == "test")
    sessions = Sessions.from_events(test)
    session, _, _, has_next = sessions.prefixes()
    session_of = session[has_next]
    train = events.filter(pl.col("split").is_in(["train"] + (["valid"] if fit == "train+valid" else [])))
    catalogue = ItemCatalogue.fit(train["item_id"].to_numpy())
    columns = catalogue.columns(sessions.item_ids)
    bounds = list(zip(sessions.starts[:-1], sessions.starts[1:]))
    knn = SessionKNN().fit(train["session_id"].to_numpy(), train["item_id"].to_numpy(),
                           train["timestamp"].to_numpy(), catalogue)
    knn_hit, knn_rr = hits_and_reciprocal_ranks(knn.next_item_ranks(
        [columns[a:b] for a, b in bounds], [sessions.item_ids[a:b] for a, b in bounds]))
    n_sessions = len(sessions)
    per_session = np.bincount(session_of, minlength=n_sessions)
    print(f"sknn fit on {fit}: R@20 {knn_hit.mean():.4f} MRR@20 {knn_rr.mean():.4f}")
    for model in models:
        hit, rr = hits_and_reciprocal_ranks(score_model(load_model(model, threads=1), test, sessions).next_item_ranks)
        diff_hit = np.bincount(session_of, hit - knn_hit, minlength=n_sessions)
        diff_rr = np.bincount(session_of, rr - knn_rr, minlength=n_sessions)
        rng = np.random.default_rng(0)
        boot_hit, boot_rr = [], []
        for _ in range(RESAMPLES):
            idx = rng.integers(0, n_sessions, n_sessions)
            count = per_session[idx].sum()
            boot_hit.append(diff_hit[idx].sum() / count)
            boot_rr.append(diff_rr[idx].sum() / count)
        ci_hit = np.round(np.percentile(boot_hit, [2.5, 97.5]), 4)
        ci_rr = np.round(np.percentile(boot_rr, [2.5, 97.5]), 4)
        print(f"{model}: R@20 {hit.mean():.4f} diff {hit.mean() - knn_hit.mean():+.4f} {ci_hit} "
              f"MRR@20 {rr.mean():.4f} diff {rr.mean() - knn_rr.mean():+.4f} {ci_rr}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
