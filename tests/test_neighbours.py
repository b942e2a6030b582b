"""The item-neighbour table (training/models/neighbours.py) on hand-made logs whose
table is computed by hand, the in-graph scorer and mixture, the fit of the mixture
weight after training, and the ONNX export of a GRU that carries them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from training.models import build_model
from training.models.neighbours import (NeighbourHead, NeighbourTableParams, fit_neighbour_table,
                                        recent_per_position)

torch.set_num_threads(1)
A, B, C, D = 2, 3, 4, 5          # vocabulary indices (0 pad, 1 OOV)


def table_of(sessions: list[list[int]], params: NeighbourTableParams, n_items: int = 6, seconds=None):
    session_index = np.concatenate([[s] * len(items) for s, items in enumerate(sessions)])
    items = np.concatenate(sessions)
    seconds = np.zeros(len(items)) if seconds is None else np.asarray(seconds, dtype=float)
    return fit_neighbour_table(session_index, items, seconds, n_items, params)


def row(table, item) -> dict[int, float]:
    targets, weights = table
    return {int(t): float(w) for t, w in zip(targets[item], weights[item]) if w > 0}


def test_pair_weights_by_distance_and_direction_computed_by_hand():
    # s0 = A B C, s1 = B C. Forward pairs 1/d: A->B 1, B->C 1 + 1, A->C 1/2. Backward x0.5:
    # B->A 0.5, C->B 0.5 + 0.5, C->A 0.25. The s0 -> s1 boundary (C then B) is no pair.
    table = table_of([[A, B, C], [B, C]], NeighbourTableParams(top_n=3, steps=2, backward=0.5, idf=0.0))
    assert row(table, A) == pytest.approx({B: 2 / 3, C: 1 / 3})
    assert row(table, B) == pytest.approx({C: 0.8, A: 0.2})
    assert row(table, C) == pytest.approx({B: 0.8, A: 0.2})
    assert row(table, 0) == {} and row(table, 1) == {} and row(table, D) == {}
    assert table[0].dtype == np.int32 and table[1].dtype == np.float32
    assert table[0][A].tolist() == [B, C, 0]                # strongest first, padding after


def test_top_n_steps_repeats_oov_and_backward_off():
    # steps 1 drops A->C; backward 0 keeps rules only; top 1 keeps the strongest target.
    table = table_of([[A, B, C], [B, C]], NeighbourTableParams(top_n=1, steps=1, backward=0.0, idf=0.0))
    assert row(table, A) == {B: 1.0} and row(table, B) == {C: 1.0} and row(table, C) == {}
    # a repeat (A A) and the OOV index (1) make no pair; A 1 B: A->B at distance 2 only
    table = table_of([[A, A, 1, B]], NeighbourTableParams(top_n=3, steps=2, backward=0.0, idf=0.0))
    assert row(table, A) == {B: 1.0} and row(table, 1) == {}
    assert table[1][A].tolist() == pytest.approx([1.0, 0.0, 0.0])   # A->B only (1/2, at distance 2)


def test_session_recency_and_idf_weights():
    day = 86400.0
    # old session (last event a day before the newest) A->B, new session A->C
    table = table_of([[A, B], [A, C]], NeighbourTableParams(top_n=3, steps=1, backward=0.0, recency_days=1.0, idf=0.0),
                     seconds=[0.0, 0.0, day, day])
    old = math.exp(-1.0)
    assert row(table, A) == pytest.approx({B: old / (1 + old), C: 1 / (1 + old)})
    # idf: B occurs 3 times, C once in 3 sessions: weights 1 + log(3/3), 1 + log(3/1)
    table = table_of([[A, B], [A, C], [B, B]], NeighbourTableParams(top_n=3, steps=1, backward=0.0, idf=1.0))
    wb, wc = 1.0, 1.0 + math.log(3.0)
    assert row(table, A) == pytest.approx({B: wb / (wb + wc), C: wc / (wb + wc)})


def test_bad_table_parameters_are_refused():
    for bad in (dict(top_n=0), dict(steps=0), dict(backward=-1.0), dict(recency_days=-2.0), dict(idf=-1.0)):
        with pytest.raises(ValueError):
            NeighbourTableParams(**bad)


def test_head_sums_recent_rows_with_position_weights_and_mixes():
    head = NeighbourHead(n_items=6, top_n=2, window=3, decay=1.0)
    targets = np.zeros((6, 2), np.int32)
    weights = np.zeros((6, 2), np.float32)
    targets[A], weights[A] = [B, C], [0.75, 0.25]
    targets[B], weights[B] = [D, 0], [1.0, 0.0]
    head.load_table((targets, weights))
    recent = torch.tensor([[0, B, A],      # A newest (weight 1), B one step back (e^-1)
                           [0, 0, 1],      # only OOV: no neighbours
                           [A, 0, 0]])     # padding after A cannot happen, but reads as A two back
    p = head.distribution(recent)
    e = math.exp(-1.0)
    want = torch.zeros(6)
    want[B], want[C], want[D] = 0.75, 0.25, e
    torch.testing.assert_close(p[0], want / want.sum())
    assert not p[1].any()
    torch.testing.assert_close(p[2], torch.tensor([0, 0, 0, 0.75, 0.25, 0.0]))
    log_model = torch.log_softmax(torch.randn(3, 6), dim=-1)
    mixed = head.mix(log_model, recent, 0.3)
    torch.testing.assert_close(mixed.exp(), 0.7 * log_model.exp() + 0.3 * p)
    torch.testing.assert_close(torch.logsumexp(mixed[0], 0), torch.tensor(0.0))


def test_recent_per_position_matches_the_step_slots():
    item = torch.tensor([[7, 8, 9, 0]])
    recent = recent_per_position(item, 3)                    # (1, 4, 3)
    assert recent[0].tolist() == [[0, 0, 7], [0, 7, 8], [7, 8, 9], [8, 9, 0]]


def neighbour_model(mix=0.4):
    """A tiny GRU with a random neighbour table (tests/test_models.py steps it exactly)."""
    torch.manual_seed(0)
    model = build_model("gru", dict(n_items=50, n_categories=10, embedding_dim=16, hidden_dim=24, dropout=0.0,
                                    repeat=True, wide=True, neighbours=6, neighbour_window=4,
                                    neighbour_mix=mix))
    rng = np.random.default_rng(0)
    weights = rng.random((50, 6)).astype(np.float32)
    weights[:2] = 0.0                                          # padding and OOV rows are empty
    model.neighbours.load_table((rng.integers(2, 50, (50, 6)).astype(np.int32), weights))
    return model.eval()


def test_fit_neighbour_mix_picks_the_weight_that_ranks_valid_best_and_exports(yoochoose, tmp_path):
    """On real data a barely trained GRU gains from its neighbour table: the fitted weight
    is > 0 and its valid figures are the best of the grid. Export (which fails unless
    onnxruntime equals eager torch within 1e-5 for the window AND the step graph) carries
    the table as constants and the scatter that sums its rows."""
    import onnx

    from training.export import export
    from stream.cli import build_parser
    from training.train import train

    args = build_parser().parse_args([
        "train", "--data", str(yoochoose), "--out", str(tmp_path / "ck"), "--max-steps", "5", "--epochs", "1",
        "--batch-size", "32", "--embedding-dim", "16", "--hidden-dim", "24", "--threads", "1",
        "--max-valid-windows", "300"])
    train(args)
    log = json.loads((tmp_path / "ck" / "train_log.json").read_text())
    fitted = log["neighbours"]
    assert fitted["fit_on"] == "valid (held out)" and fitted["mix"] > 0
    grid = {row["mix"]: row for row in fitted["grid"]}
    best = grid[fitted["mix"]]
    assert best["recall@20"] + best["mrr@20"] == max(r["recall@20"] + r["mrr@20"] for r in grid.values())
    assert best["recall@20"] > grid[0.0]["recall@20"]
    config = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)["config"]
    assert config["neighbour_mix"] == fitted["mix"] and config["neighbours"] == 100
    export(tmp_path / "ck", tmp_path / "model")
    for graph in ("model.onnx", "model_step.onnx"):
        ops = {node.op_type for node in onnx.load(tmp_path / "model" / graph).graph.node}
        assert "ScatterElements" in ops, graph


def test_bad_neighbour_options_fail_at_once(yoochoose, tmp_path):
    from stream.cli import build_parser
    from stream.errors import ClickscoreError
    from training.train import train

    for bad, name in ((["--neighbour-mix", "1.5"], "--neighbour-mix"), (["--neighbour-window", "0"], "--neighbour-window"),
                      (["--neighbour-top-n", "0"], "--neighbour-top-n")):
        args = build_parser().parse_args(["train", "--data", str(yoochoose), "--out", str(tmp_path / "x"), *bad])
        with pytest.raises(ClickscoreError, match=name):
            train(args)


def test_fit_on_train_plus_valid_takes_the_given_or_default_weight(yoochoose, tmp_path):
    """Nothing is held out with --fit-on train+valid: the weight is never fitted in-sample."""
    from stream.cli import build_parser
    from training.train import NEIGHBOUR_MIX_DEFAULT, train

    common = ["--data", str(yoochoose), "--max-steps", "3", "--epochs", "1", "--batch-size", "32",
              "--embedding-dim", "16", "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "200",
              "--fit-on", "train+valid"]
    for name, extra, want in (("default", [], NEIGHBOUR_MIX_DEFAULT), ("given", ["--neighbour-mix", "0.25"], 0.25)):
        train(build_parser().parse_args(["train", "--out", str(tmp_path / name), *common, *extra]))
        fitted = json.loads((tmp_path / name / "train_log.json").read_text())["neighbours"]
        assert fitted["mix"] == want and fitted["fit_on"].startswith(name)
        assert torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["config"]["neighbour_mix"] == want
