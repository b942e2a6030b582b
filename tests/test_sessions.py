"""The session-neighbour index and head (training/models/sessions.py): the index on a
hand-made log computed by hand; the in-graph scores equal training/knn.py's VSTAN (the
numpy scorer that evaluate runs) when the index's caps do not bind, and a direct loop
over the capped index when they do; the fit of the mixture weight after training, the
options that fail at once, and the ONNX export of a GRU that carries the head."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from training.models.sessions import SessionIndexParams, SessionNeighbourHead, fit_session_index

torch.set_num_threads(1)
A, B, C, D, E = 2, 3, 4, 5, 6          # vocabulary indices (0 pad, 1 OOV)
DAY = 86400.0


def index_of(sessions: list[list[int]], params: SessionIndexParams, n_items: int = 8, days=None):
    session_index = np.concatenate([[s] * len(items) for s, items in enumerate(sessions)])
    items = np.concatenate(sessions)
    # each session's events one second apart, ending on its day
    days = np.arange(len(sessions)) if days is None else np.asarray(days, dtype=float)
    seconds = np.concatenate([days[s] * DAY - (len(items) - 1 - np.arange(len(items)))
                              for s, items in enumerate(sessions)])
    return fit_session_index(session_index, items, seconds, n_items, params)


def test_index_computed_by_hand():
    # s0 = A B A (day 0), s1 = B C (day 1), s2 = C OOV D (day 2); 3 sessions, 8 events
    index = index_of([[A, B, A], [B, C], [C, 1, D]], SessionIndexParams(posting=2, length=2, recency_days=1.0,
                                                                        idf=2.0))
    S = 3
    assert index.n_rows == S + 1
    # posting: most recent sessions first, padded with the dummy row S; pad/OOV rows empty
    assert index.posting[A].tolist() == [0, S] and index.posting[B].tolist() == [1, 0]
    assert index.posting[C].tolist() == [2, 1] and index.posting[D].tolist() == [2, S]
    assert (index.posting[[0, 1, E]] == S).all()
    # weight: 1/sqrt(distinct known items) x exp(-(T - t_n) / 1 day); dummy 0
    np.testing.assert_allclose(index.session_weight, [math.exp(-2) / math.sqrt(2), math.exp(-1) / math.sqrt(2),
                                                      1 / math.sqrt(2), 0.0], rtol=1e-6)
    # items: the L most recent distinct ones by last position, with that position
    assert index.items.tolist() == [[A, B], [C, B], [D, C], [0, 0]]
    assert index.positions.tolist() == [[3, 2], [2, 1], [3, 1], [0, 0]]
    # item weight 1 + idf log(S / events); 0 for pad and OOV
    counts = {A: 2, B: 2, C: 2, D: 1}
    want = np.zeros(8)
    want[2:] = 1 + 2 * np.log(3)                                     # unseen items: count floor 1
    for item, n in counts.items():
        want[item] = 1 + 2 * math.log(3 / n)
    np.testing.assert_allclose(index.item_weight, want, rtol=1e-6)


def test_session_cap_keeps_the_most_recent_sessions_and_the_full_idf():
    sessions = [[A, B, A], [B, C], [C, 1, D]]
    full = index_of(sessions, SessionIndexParams(posting=2, length=2, recency_days=1.0, idf=2.0))
    capped = index_of(sessions, SessionIndexParams(posting=2, length=2, recency_days=1.0, idf=2.0, sessions=2))
    assert capped.n_rows == 3                                        # s1, s2 (days 1, 2) as rows 0, 1; dummy 2
    assert capped.items.tolist() == full.items[1:].tolist()
    np.testing.assert_allclose(capped.session_weight, full.session_weight[1:])
    assert capped.posting[A].tolist() == [2, 2] and capped.posting[B].tolist() == [0, 2]
    assert capped.posting[C].tolist() == [1, 0]
    np.testing.assert_allclose(capped.item_weight, full.item_weight)   # idf over every training session


def test_bad_index_parameters_are_refused():
    for bad in (dict(posting=0), dict(length=0), dict(recency_days=-1.0), dict(idf=-0.5), dict(sessions=-1)):
        with pytest.raises(ValueError):
            SessionIndexParams(**bad)


def _vstan_log(seed: int, n_sessions: int = 14, n_items: int = 12):
    rng = np.random.default_rng(seed)
    sessions = [list(rng.integers(ITEM0, n_items, rng.integers(2, 7))) for _ in range(n_sessions)]
    return sessions, rng.permutation(n_sessions).astype(float) * 0.7   # distinct session days


ITEM0 = 2


def test_head_equals_knn_vstan_when_the_caps_do_not_bind():
    """Every posting list, session and neighbour kept: the in-graph p_sess is VSTAN's
    normalised scores (training/knn.py, which `clickscore evaluate` reports), with the
    window covering the prefix (its repeats and OOV included)."""
    from training.baselines import ItemCatalogue
    from training.knn import NeighbourScorer

    n_items = 12
    sessions, days = _vstan_log(0, n_items=n_items)
    params = SessionIndexParams(posting=64, length=16, recency_days=5.0, idf=2.0)
    index = index_of(sessions, params, n_items=n_items, days=days)
    head = SessionNeighbourHead(n_items, index.n_rows, 64, 16, k=100, window=8, spw=0.5, ipw=2.0, inh=2.0)
    head.load_index(index)

    ids = [[f"i{item}" for item in s] for s in sessions]
    session_ids = np.concatenate([[s] * len(x) for s, x in enumerate(ids)])
    flat_ids = [i for x in ids for i in x]
    seconds = np.concatenate([days[s] * DAY - (len(x) - 1 - np.arange(len(x))) for s, x in enumerate(ids)])
    catalogue = ItemCatalogue.fit(flat_ids)
    vstan = NeighbourScorer.vstan(k=100, sample_size=1000).fit(session_ids, flat_ids, seconds * 1000.0, catalogue)
    vocab = np.array([int(i[1:]) for i in catalogue.ids])           # catalogue column -> vocabulary index

    now = seconds.max() + 3600.0
    prefixes = [[A, B], [B, C, B, D], [E, 1, A, E], [D], [A, B, C, D, E, A, 7]]
    for prefix in prefixes:
        columns = catalogue.columns([f"i{i}" if i >= ITEM0 else "unknown" for i in prefix])
        raw = [f"i{i}" if i >= ITEM0 else "unknown" for i in prefix]
        relevant = np.unique(np.concatenate([vstan.sessions_of_item[c].indices for c in columns if c >= 0]))
        want = np.zeros(n_items)
        want[vocab] = vstan.prefix_scores(columns, raw, now, relevant)
        assert want.sum() > 0
        recent = torch.tensor([[0] * (8 - len(prefix)) + prefix])    # (1, K) newest last
        got = head.distribution(recent)[0].numpy()
        np.testing.assert_allclose(got, want / want.sum(), rtol=1e-4, atol=1e-6)


def _direct(index, recent: list[int], k: int, K: int, spw: float, ipw: float, inh: float) -> np.ndarray:
    """The head's definition as plain loops over the (capped) index."""
    n_items, S1 = len(index.item_weight), index.n_rows
    slots = {}                                                        # item -> newest slot
    for j, item in enumerate(recent):
        if item >= ITEM0:
            slots[item] = j
    sim, bits = np.zeros(S1), {}
    for item, j in slots.items():
        for s in index.posting[item]:
            sim[s] += math.exp(-(K - 1 - j) / spw)
            bits.setdefault(s, []).append(j)
    sim *= index.session_weight
    scores = np.zeros(n_items)
    for s in np.argsort(-sim, kind="stable")[:k]:
        if sim[s] == 0:
            continue
        factor = sim[s] * math.exp((max(bits[s]) - (K - 1)) / ipw)
        held = [(int(i), float(q)) for i, q in zip(index.items[s], index.positions[s]) if i]
        q_star = max([q for i, q in held if i in slots], default=0.0)
        for i, q in held:
            scores[i] += factor * index.item_weight[i] * math.exp(-abs(q - q_star) / inh)
    return scores / scores.sum() if scores.sum() else scores


@pytest.mark.parametrize("posting,length,k", [(3, 2, 2), (2, 4, 5), (64, 3, 1)])
def test_head_equals_a_direct_loop_over_the_capped_index(posting, length, k):
    n_items = 12
    sessions, days = _vstan_log(1, n_sessions=20, n_items=n_items)
    index = index_of(sessions, SessionIndexParams(posting=posting, length=length, recency_days=3.0, idf=1.0),
                     n_items=n_items, days=days)
    K = 6
    head = SessionNeighbourHead(n_items, index.n_rows, posting, length, k=k, window=K, spw=1.0, ipw=2.0, inh=1.5)
    head.load_index(index)
    recent = [[0, 0, 0, 0, A, B], [C, 1, D, C, E, 7], [0, 0, 0, 0, 0, 9], [A, A, A, B, B, B]]
    got = head.distribution(torch.tensor(recent)).numpy()            # (4, n_items)
    for row, r in zip(got, recent):
        np.testing.assert_allclose(row, _direct(index, r, k, K, 1.0, 2.0, 1.5), rtol=1e-4, atol=1e-6)


def test_padding_oov_and_unseen_items_give_nothing_and_mix_is_a_distribution():
    index = index_of([[A, B], [B, C]], SessionIndexParams(posting=2, length=2))
    head = SessionNeighbourHead(8, index.n_rows, 2, 2, k=2, window=3)
    head.load_index(index)
    p = head.distribution(torch.tensor([[0, 0, 0], [1, 0, 1], [0, 0, E], [0, 1, A]]))
    assert p[:3].abs().sum() == 0                                     # nothing known: all zero
    torch.testing.assert_close(p[3].sum(), torch.tensor(1.0))
    assert p[3, :ITEM0].sum() == 0 and p[3, A] > 0 and p[3, B] > 0
    log_p = torch.log_softmax(torch.randn(4, 8), dim=-1)
    mixed = SessionNeighbourHead.mix(log_p, p, 0.3)
    torch.testing.assert_close(torch.logsumexp(mixed[3], dim=0), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[0], log_p[0] + math.log(0.7))   # no neighbours: the model, scaled


def test_fit_session_mix_on_valid_and_export_carries_the_head(yoochoose, tmp_path):
    """A barely trained GRU on real data gains from the session head: the fitted weight is
    > 0 and its valid figures are the best of the grid. Export (which fails unless
    onnxruntime equals eager torch within 1e-5 for the window AND the step graph) carries
    the index as constants and its TopK."""
    import onnx

    from stream.cli import build_parser
    from training.export import export
    from training.train import train

    args = build_parser().parse_args([
        "train", "--data", str(yoochoose), "--out", str(tmp_path / "ck"), "--max-steps", "5", "--epochs", "1",
        "--batch-size", "32", "--embedding-dim", "16", "--hidden-dim", "24", "--threads", "1",
        "--max-valid-windows", "300", "--stack-gbm", "false", "--session-k", "100", "--session-posting", "100"])
    train(args)
    fitted = json.loads((tmp_path / "ck" / "train_log.json").read_text())["sessions"]
    assert fitted["fit_on"] == "valid (held out)" and fitted["mix"] > 0
    grid = {row["mix"]: row for row in fitted["grid"]}
    best = grid[fitted["mix"]]
    assert best["recall@20"] + best["mrr@20"] == max(r["recall@20"] + r["mrr@20"] for r in grid.values())
    assert best["mrr@20"] > grid[0.0]["mrr@20"]
    config = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)["config"]
    assert config["session_mix"] == fitted["mix"] and config["session_neighbours"] == 100
    assert config["session_rows"] == fitted["rows"] > 1000
    export(tmp_path / "ck", tmp_path / "model")
    for graph in ("model.onnx", "model_step.onnx"):
        ops = {node.op_type for node in onnx.load(tmp_path / "model" / graph).graph.node}
        assert {"TopK", "ScatterElements"} <= ops, graph


def test_session_options_off_and_bad_values(yoochoose, tmp_path):
    from stream.cli import build_parser
    from stream.errors import ClickscoreError
    from training.train import SESSION_MIX_DEFAULT, train

    for bad, name in ((["--session-mix", "1.5"], "--session-mix"), (["--session-window", "25"], "--session-window"),
                      (["--session-posting", "0"], "--session-posting"), (["--session-k", "0"], "--session-k")):
        args = build_parser().parse_args(["train", "--data", str(yoochoose), "--out", str(tmp_path / "x"), *bad])
        with pytest.raises(ClickscoreError, match=name):
            train(args)
    common = ["--data", str(yoochoose), "--max-steps", "2", "--epochs", "1", "--batch-size", "32",
              "--embedding-dim", "16", "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "100",
              "--stack-gbm", "false", "--neighbours", "false"]
    train(build_parser().parse_args(["train", "--out", str(tmp_path / "off"), *common, "--session-neighbours", "false"]))
    assert json.loads((tmp_path / "off" / "train_log.json").read_text())["sessions"] is None
    assert torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=True)["config"]["session_neighbours"] == 0
    # --fit-on train+valid --epochs N holds nothing out: the default weight, never fitted in-sample
    train(build_parser().parse_args(["train", "--out", str(tmp_path / "tv"), *common, "--fit-on", "train+valid"]))
    fitted = json.loads((tmp_path / "tv" / "train_log.json").read_text())["sessions"]
    assert fitted["mix"] == SESSION_MIX_DEFAULT and fitted["fit_on"].startswith("default") and not fitted["grid"]
