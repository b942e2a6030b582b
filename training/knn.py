"""Next-item baselines of the session-kNN family and sequential rules, from their papers.

    catalogue = ItemCatalogue.fit(train_item_ids)              # training/baselines.py
    vstan = NeighbourScorer.vstan().fit(train_sessions, train_items, train_ms, catalogue)
    ranks = vstan.next_item_ranks(test_columns, test_raw_items, test_ms)
    sr = SequentialRules().fit(train_sessions, train_items, catalogue)
    ranks = sr.next_item_ranks(test_columns)

Definitions (Ludewig & Jannach 2018, "Evaluation of session-based recommendation
algorithms"; Garg et al. 2019, "Sequence and time aware neighborhood for session-based
recommendations: STAN"; Ludewig et al. 2021, "Empirical analysis of session-based
recommendation algorithms" for VSTAN), as session-rec implements them. For a prefix
s = (s_1 .. s_L) of the current session (L events, repeats included) at time t:

- candidates: the training sessions that share an item with s, the `sample_size` most
  recent of them (by their last event);
- position weight of each distinct item i of s, from the LAST position p(i) it has in s:
  V-SKNN quadratic (p/L)^2 (or div p/L); STAN/VSTAN exp((p - L) / lambda_spw);
- similarity to a candidate n (N = its distinct items):
  V-SKNN   sum_{i in s n N} w(i) / |distinct s|                              ("vec")
  STAN     sum_{i in s n N} w(i) / (sqrt(sum_{i in s} w(i)^2) sqrt(|N|))       (cosine)
           times exp(-(t - t_n) / lambda_snh) with t_n the neighbour's last event;
- the k most similar candidates are the neighbours;
- score of an item j of neighbour n, summed over neighbours:
  V-SKNN   sim_n * (1 + lambda_idf * idf_j) / (L - p*_n + 1), p*_n = the last position
           in s whose item is in n ("div" score decay);
  STAN     sim_n * exp(-|q_n(j) - q*_n| / lambda_inh), q_n(j) = last position of j in
           n's event sequence, q*_n = the last position in n of an item of s;
  VSTAN    STAN's, times (1 + lambda_idf * idf_j) and exp((p*_n - L) / lambda_ipw).
  idf_j = log(training sessions / training events of j). Items already in s are scored
  too (session-rec's remind=True).
- SR (sequential rules, Kamehkhosh et al. 2017): for every training pair of events
  (a at position u, b at position v > u, v - u <= steps) in a session, rule a -> b gains
  f(v - u) (quadratic 1/d^2, or div 1/d); each item keeps its `pruning` strongest rules;
  a prefix's scores are the rules of its last item.

Default parameters are session-rec's for rsc15 (conf/example_next.yml for SR and
V-SKNN on yoochoose-clicks-100k, conf/save/rsc15 for STAN and VSTAN); docs/results.md
compares the figures. Ranking: every catalogue item is ranked; ties (zero scores
included) break toward the more popular item, as for the other baselines.

The neighbour search runs prefix by prefix (a session grows event by event, as in
session-rec's predict_next), each step vectorised over its candidates with scipy.sparse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from training.baselines import ItemCatalogue
from training.metrics import target_ranks

RANK_BATCH = 256


def _events_by_session(session_ids: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(session index per event, position 1.. of each event in its session, first event of
    each session). Events must be grouped by session in time order (contract order)."""
    session_ids = np.asarray(session_ids)
    change = np.concatenate([[True], session_ids[1:] != session_ids[:-1]]) if len(session_ids) else np.zeros(0, bool)
    session_index = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    position = np.arange(len(session_ids)) - starts[session_index] + 1
    return session_index, position, starts


@dataclass(frozen=True)
class NeighbourParams:
    """One member of the family; None switches a term off."""

    name: str
    k: int
    sample_size: int
    similarity: str                     # "vec" (V-SKNN) or "cosine" (STAN, VSTAN)
    position_weight: str                # "quadratic" | "div" (V-SKNN) | "exp" (STAN: lambda_spw)
    lambda_spw: float | None = None
    lambda_snh_days: float | None = None
    lambda_inh: float | None = None
    lambda_ipw: float | None = None
    lambda_idf: float | None = None
    score_decay: str | None = None      # "div": V-SKNN's 1 / (steps back to the last shared item)


class NeighbourScorer:
    """V-SKNN, STAN or VSTAN (see the module docstring); pick one with the constructors."""

    def __init__(self, params: NeighbourParams):
        self.params = params

    @classmethod
    def vsknn(cls, k: int = 500, sample_size: int = 5000, weighting: str = "quadratic",
              idf_weighting: float = 5.0) -> "NeighbourScorer":
        # session-rec conf/example_next.yml, yoochoose-clicks-100k.
        return cls(NeighbourParams("vsknn", k, sample_size, "vec", weighting,
                                   lambda_idf=idf_weighting, score_decay="div"))

    @classmethod
    def stan(cls, k: int = 1000, sample_size: int = 10000, lambda_spw: float = 0.5,
             lambda_snh_days: float = 20.0, lambda_inh: float = 0.5) -> "NeighbourScorer":
        # session-rec conf/save/rsc15/window/window_rsc15_stan.yml, "stan-hr".
        return cls(NeighbourParams("stan", k, sample_size, "cosine", "exp", lambda_spw=lambda_spw,
                                   lambda_snh_days=lambda_snh_days, lambda_inh=lambda_inh))

    @classmethod
    def vstan(cls, k: int = 1500, sample_size: int = 10000, lambda_spw: float = 0.5,
              lambda_snh_days: float = 5.0, lambda_inh: float = 2.0, lambda_ipw: float = 2.0,
              lambda_idf: float = 2.0) -> "NeighbourScorer":
        # session-rec conf/save/rsc15/window/window_rsc15_vstan.yml, "vstan-mrr" (its
        # "vstan-hr" gave 0.6806 / 0.3675 here, 0.010 below session-rec's own figure).
        return cls(NeighbourParams("vstan", k, sample_size, "cosine", "exp", lambda_spw=lambda_spw,
                                   lambda_snh_days=lambda_snh_days, lambda_inh=lambda_inh,
                                   lambda_ipw=lambda_ipw, lambda_idf=lambda_idf))

    # -- fit -------------------------------------------------------------------------
    def fit(self, session_ids: Sequence, item_ids: Sequence[str], timestamps_ms: Sequence[int],
            catalogue: ItemCatalogue) -> "NeighbourScorer":
        """Training events in contract order (grouped by session, time order inside)."""
        self.catalogue = catalogue
        session_index, position, starts = _events_by_session(session_ids)
        columns = catalogue.columns(item_ids)
        keep = columns >= 0
        n_sessions, n_items = len(starts), catalogue.size
        # (S, n_items): the last position (1-based, over all events) of each item in each
        # session; duplicates resolved by max, so a repeated item keeps its last position.
        rows, cols, pos = session_index[keep], columns[keep], position[keep].astype(np.float64)
        order = np.lexsort((pos, cols, rows))
        rows, cols, pos = rows[order], cols[order], pos[order]
        last = np.concatenate([(rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1]), [True]]) if len(rows) else rows
        self.last_position = sp.csr_matrix((pos[last], (rows[last], cols[last])), shape=(n_sessions, n_items))
        self.incidence = self.last_position.copy()
        self.incidence.data[:] = 1.0                                  # (S, n_items) 0/1
        self.sessions_of_item = self.incidence.T.tocsr()              # (n_items, S)
        self.session_sizes = np.diff(self.incidence.indptr).astype(np.float64)   # |N|
        seconds = np.asarray(timestamps_ms, dtype=np.float64) / 1000.0
        self.session_time = np.full(n_sessions, -np.inf)
        np.maximum.at(self.session_time, session_index, seconds)      # (S,) last event
        events = np.asarray(catalogue.counts, dtype=np.float64)
        self.idf = np.log(max(n_sessions, 1) / np.maximum(events, 1.0))  # (n_items,)
        return self

    # -- one prefix --------------------------------------------------------------------
    def prefix_scores(self, columns: np.ndarray, raw_items: Sequence, now_s: float,
                      relevant: np.ndarray) -> np.ndarray:
        """(n_items,) scores after the prefix `columns` (catalogue columns, -1 unknown);
        `relevant`: the training sessions sharing an item with it (sorted indices)."""
        p = self.params
        n_items = self.catalogue.size
        scores = np.zeros(n_items)
        if relevant.size == 0:
            return scores
        L = len(columns)
        # Last position of each distinct item of the prefix (unknown ones by raw id).
        last_of: dict = {}
        for position, (column, raw) in enumerate(zip(columns, raw_items), start=1):
            last_of[(int(column), raw if column < 0 else None)] = position
        known = {key[0]: position for key, position in last_of.items() if key[0] >= 0}
        distinct = len(last_of)
        positions = np.array(list(last_of.values()), dtype=np.float64)
        if p.position_weight == "quadratic":
            weights_all = (positions / L) ** 2
        elif p.position_weight == "div":
            weights_all = positions / L
        elif p.lambda_spw:
            weights_all = np.exp((positions - L) / p.lambda_spw)
        else:
            weights_all = np.ones_like(positions)
        weight = np.zeros(n_items)                       # (n_items,) prefix item weights
        last_in_prefix = np.zeros(n_items)               # (n_items,) last position, 0 = absent
        for (column, _), w, position in zip(last_of, weights_all, positions):
            if column >= 0:
                weight[column] = w
                last_in_prefix[column] = position

        candidates = relevant
        if candidates.size > p.sample_size:
            # The sample_size most recent sessions (ties: the lower index, stable).
            recency = np.argsort(-self.session_time[candidates], kind="stable")[:p.sample_size]
            candidates = np.sort(candidates[recency])
        sub = self.incidence[candidates]                                   # (C, n_items)
        dot = sub @ weight                                                 # (C,)
        if p.similarity == "vec":
            similarity = dot / distinct
        else:
            similarity = dot / (np.sqrt(np.sum(weights_all ** 2)) * np.sqrt(self.session_sizes[candidates]))
        if p.lambda_snh_days:
            similarity = similarity * np.exp(-(now_s - self.session_time[candidates])
                                             / (p.lambda_snh_days * 86400.0))
        # The k most similar (ties: the more recent session).
        order = np.lexsort((-self.session_time[candidates], -similarity))[:p.k]
        order = order[similarity[order] > 0]
        neighbours, similarity = candidates[order], similarity[order]      # (K,), (K,)

        # p*: the last position in the prefix of an item the neighbour holds.
        shared_last = self.incidence[neighbours].multiply(last_in_prefix[None, :]).tocsr()
        p_star = shared_last.max(axis=1).toarray().ravel()                 # (K,)
        row_factor = similarity
        if p.score_decay == "div":
            row_factor = row_factor / (L - p_star + 1.0)
        if p.lambda_ipw:
            row_factor = row_factor * np.exp((p_star - L) / p.lambda_ipw)
        entries = self.last_position[neighbours].tocoo()                   # (K, n_items) last positions in n
        value = row_factor[entries.row]
        if p.lambda_inh:
            in_prefix = last_in_prefix[entries.col] > 0
            q_star = np.zeros(len(neighbours))
            np.maximum.at(q_star, entries.row[in_prefix], entries.data[in_prefix])
            value = value * np.exp(-np.abs(entries.data - q_star[entries.row]) / p.lambda_inh)
        if p.lambda_idf:
            value = value * (1.0 + p.lambda_idf * self.idf[entries.col])
        np.add.at(scores, entries.col, value)
        return scores

    # -- every prefix of every session ---------------------------------------------------
    def next_item_ranks(self, sessions: Sequence[np.ndarray], session_raw_items: Sequence[Sequence] | None = None,
                        session_times_ms: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Rank of the next item after every prefix (all but each session's last event).

        Cost: one sparse step per prefix over at most `sample_size` candidates, a few ms;
        fine for the shared samples, hours for the full 33M-click YOOCHOOSE test.
        """
        if session_times_ms is None and self.params.lambda_snh_days:
            raise ValueError(f"{self.params.name} decays neighbours by age: give session_times_ms")
        ranker = _Ranker()
        for s, columns in enumerate(sessions):
            columns = np.asarray(columns, dtype=np.int64)
            raw = session_raw_items[s] if session_raw_items is not None else [("#", t) for t in range(len(columns))]
            times = (np.asarray(session_times_ms[s], dtype=np.float64) / 1000.0
                     if session_times_ms is not None else np.zeros(len(columns)))
            relevant = np.zeros(0, dtype=np.int64)
            for t in range(len(columns) - 1):
                column = columns[t]
                if column >= 0:
                    holders = self.sessions_of_item.indices[
                        self.sessions_of_item.indptr[column]:self.sessions_of_item.indptr[column + 1]]
                    relevant = np.union1d(relevant, holders)
                ranker.add(self.prefix_scores(columns[:t + 1], raw[:t + 1], times[t], relevant), columns[t + 1])
        return ranker.ranks()


class SequentialRules:
    """SR (see the module docstring): rules a -> b weighted by 1/d^2 (or 1/d) for b up to
    `steps` events after a, each item's `pruning` strongest rules kept."""

    def __init__(self, steps: int = 20, weighting: str = "quadratic", pruning: int = 20):
        if weighting not in ("quadratic", "div"):
            raise ValueError(f"unknown SR weighting {weighting!r}")
        self.steps, self.weighting, self.pruning = steps, weighting, pruning

    def fit(self, session_ids: Sequence, item_ids: Sequence[str], catalogue: ItemCatalogue) -> "SequentialRules":
        self.catalogue = catalogue
        session_index, _, _ = _events_by_session(session_ids)
        columns = catalogue.columns(item_ids)
        n = catalogue.size
        sources, targets, weights = [], [], []
        for distance in range(1, self.steps + 1):
            same = session_index[distance:] == session_index[:-distance]       # pairs d apart, same session
            a, b = columns[:-distance][same], columns[distance:][same]
            both = (a >= 0) & (b >= 0)
            sources.append(a[both])
            targets.append(b[both])
            weight = 1.0 / distance ** 2 if self.weighting == "quadratic" else 1.0 / distance
            weights.append(np.full(int(both.sum()), weight))
        rules = sp.csr_matrix((np.concatenate(weights), (np.concatenate(sources), np.concatenate(targets))),
                              shape=(n, n))                                  # (n_items, n_items), summed
        rules.sum_duplicates()
        if self.pruning:
            coo = rules.tocoo()
            # Strongest first within each source item (ties: the more popular target).
            order = np.lexsort((coo.col, -coo.data, coo.row))
            row, col, data = coo.row[order], coo.col[order], coo.data[order]
            starts = np.searchsorted(row, np.arange(n))
            keep = (np.arange(len(row)) - starts[row]) < self.pruning
            rules = sp.csr_matrix((data[keep], (row[keep], col[keep])), shape=(n, n))
        self.rules = rules
        return self

    def next_item_ranks(self, sessions: Sequence[np.ndarray]) -> np.ndarray:
        ranker = _Ranker()
        empty = np.zeros(self.catalogue.size)
        for columns in sessions:
            for t in range(len(columns) - 1):
                last = int(columns[t])
                scores = self.rules[last].toarray().ravel() if last >= 0 else empty
                ranker.add(scores, columns[t + 1])
        return ranker.ranks()


class _Ranker:
    """Collects (n_items,) score rows and targets, ranks them in batches."""

    def __init__(self):
        self.rows: list[np.ndarray] = []
        self.targets: list[int] = []
        self.parts: list[np.ndarray] = []

    def add(self, scores: np.ndarray, target: int) -> None:
        self.rows.append(scores)
        self.targets.append(int(target))
        if len(self.rows) >= RANK_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.parts.append(target_ranks(np.vstack(self.rows), np.array(self.targets)))
            self.rows, self.targets = [], []

    def ranks(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.parts) if self.parts else np.zeros(0)
