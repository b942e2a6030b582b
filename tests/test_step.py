"""Exact incremental scoring: the step graph (model_step.onnx) carried event by event
gives the window graph's scores, for the GRU and the dilated model, on real sessions;
sessions longer than the window fall back to the window graph (and the API says which);
a folder whose graphs disagree is refused; folders exported before still serve windows.

    .venv/bin/python -m pytest tests/test_step.py -q
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from stream.cli import main
from stream.events import ClickEvent
from stream.features import INPUT_NAMES, WINDOW, append_event, empty_window, encode_last_events, encode_windows
from stream.scoring import STEP_FILE, ModelError, ModelScorer, step_exact
from training.examples import read_events
from training.export import LastPositionScorer, write_onnx
from training.models import build_model

torch.set_num_threads(1)
KINDS = ("gru", "dilated")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def taobao(datasets, tmp_path_factory):
    """Taobao UserBehavior prepared with the real `clickscore prepare`: views, carts, buys,
    categories, and sessions longer than the window (up to 130 events)."""
    out = tmp_path_factory.mktemp("taobao")
    assert main(["prepare", "--dataset", "taobao", "--input", str(datasets / "taobao-userbehavior"),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(taobao, tmp_path_factory):
    """kind -> exported folder of a model trained a few steps with the real `clickscore train`."""
    root = tmp_path_factory.mktemp("step-models")
    folders = {}
    for kind in KINDS:
        checkpoint = root / f"ck-{kind}"
        assert main(["train", "--data", str(taobao), "--out", str(checkpoint), "--model", kind, "--seed", "3",
                     "--max-steps", "5", "--epochs", "1", "--batch-size", "32", "--embedding-dim", "16",
                     "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "300",
                     "--min-item-count", "2"]) == 0
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / kind)]) == 0
        folders[kind] = (checkpoint, root / kind)
    return folders


def session_events(frame, session_ids) -> list[list[ClickEvent]]:
    import polars as pl

    sessions = []
    for session_id in session_ids:
        rows = frame.filter(pl.col("session_id") == session_id).sort("timestamp", maintain_order=True)
        sessions.append([ClickEvent(r["session_id"], r["event_type"], r["item_id"], r["timestamp"],
                                    category_id=r["category_id"], price=r["price"])
                         for r in rows.iter_rows(named=True)])
    return sessions


def assert_same_ranking(got, want):
    """Same top-k scores; the same items wherever two scores are not within the tolerance of a tie."""
    np.testing.assert_allclose(got.buy_probability, want.buy_probability, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(got.top_scores, want.top_scores, rtol=0, atol=TOLERANCE)
    swapped = got.top_items != want.top_items
    assert np.all(np.abs(got.top_scores - want.top_scores)[swapped] <= TOLERANCE)


@pytest.mark.parametrize("kind", KINDS)
def test_stepping_real_sessions_equals_the_window_graph_for_every_event(trained, taobao, kind):
    _, folder = trained[kind]
    scorer = ModelScorer(folder, provider="cpu")
    assert scorer.supports_step
    frame = read_events(taobao)
    lengths = frame.group_by("session_id").len()
    lengths = lengths.filter(lengths["len"] <= WINDOW).sort(["len", "session_id"], descending=[True, False])
    # the 6 longest sessions that fit the window (up to 100 events) and 18 others of every length
    rng = np.random.default_rng(0)
    others = rng.choice(np.arange(6, lengths.height), size=18, replace=False)
    chosen = list(lengths["session_id"][:6]) + [lengths["session_id"][int(i)] for i in others]
    sessions = session_events(frame, chosen)
    assert max(map(len, sessions)) > 90 and min(map(len, sessions)) < 10

    artefacts = scorer.artefacts
    windows = [empty_window() for _ in sessions]
    states = scorer.initial_states(len(sessions))
    assert states.shape == (len(sessions), scorer.state_size) and scorer.state_nbytes == 4 * scorer.state_size
    checked = 0
    for position in range(max(map(len, sessions))):
        active = [b for b, s in enumerate(sessions) if position < len(s)]
        for b in active:
            windows[b] = append_event(windows[b], sessions[b][position], artefacts)
        batch_windows = [windows[b] for b in active]
        assert step_exact(batch_windows).all()
        stepped, new_states = scorer.score_step(batch_windows, states[active], top_k=20)
        assert_same_ranking(stepped, scorer.score(batch_windows, top_k=20))
        # the whole next-item matrix too, and the rebuild-from-window state equals the carried one
        step_buy, step_scores, _ = scorer.predict_step(encode_last_events(batch_windows, artefacts), states[active])
        window_buy, window_scores = scorer.predict(encode_windows(batch_windows, artefacts))
        np.testing.assert_allclose(step_buy, window_buy, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(step_scores, window_scores, rtol=0, atol=TOLERANCE)
        _, rebuilt = scorer.score_windows_with_state(batch_windows, top_k=20)
        np.testing.assert_allclose(new_states, rebuilt, rtol=0, atol=TOLERANCE)
        states[active] = new_states
        checked += len(active)
    assert checked == sum(map(len, sessions))


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_longer_than_the_window_are_scored_by_the_window_graph(trained, taobao, kind):
    _, folder = trained[kind]
    scorer = ModelScorer(folder, provider="cpu")
    frame = read_events(taobao)
    lengths = frame.group_by("session_id").len().sort(["len", "session_id"], descending=[True, False])
    long_ids = list(lengths.filter(lengths["len"] > WINDOW)["session_id"][:3])
    short_ids = list(lengths.filter(lengths["len"] < 20)["session_id"][:2])
    sessions = session_events(frame, long_ids + short_ids)
    assert len(sessions[0]) > WINDOW + 20

    windows = [empty_window() for _ in sessions]
    states = scorer.initial_states(len(sessions))
    carried = scorer.initial_states(len(sessions))   # stepped blindly, never re-windowed
    divergence = 0.0
    for position in range(max(map(len, sessions))):
        active = [b for b, s in enumerate(sessions) if position < len(s)]
        for b in active:
            windows[b] = append_event(windows[b], sessions[b][position], scorer.artefacts)
        batch_windows = [windows[b] for b in active]
        exact = step_exact(batch_windows)
        # the rule: exact while the window holds the whole session (events 1..W), not after
        assert list(exact) == [position < WINDOW for _ in active]
        got, new_states = scorer.score_step(batch_windows, states[active], top_k=20)
        assert_same_ranking(got, scorer.score(batch_windows, top_k=20))
        states[active] = new_states
        blind_buy, blind_scores, carried[active] = scorer.predict_step(
            encode_last_events(batch_windows, scorer.artefacts), carried[active])
        if position >= WINDOW:
            window_buy, window_scores = scorer.predict(encode_windows(batch_windows, scorer.artefacts))
            divergence = max(divergence, float(np.abs(blind_scores - window_scores).max()))
    if kind == "dilated":
        # receptive field 127 > 100: a carried cache still reads events the window dropped
        assert divergence > TOLERANCE


def test_encode_last_events_is_the_window_encoding_at_the_last_position(trained, taobao):
    _, folder = trained["gru"]
    artefacts = ModelScorer(folder, provider="cpu").artefacts
    frame = read_events(taobao)
    ids = list(frame.group_by("session_id").len().sort("len", descending=True)["session_id"][:40])
    windows = []
    for events in session_events(frame, ids):
        window = empty_window()
        for i, event in enumerate(events):
            window = append_event(window, event, artefacts)
            if i % 7 == 0 or i == len(events) - 1:
                windows.append(window)
    full = encode_windows(windows, artefacts)
    last = encode_last_events(windows, artefacts)
    rows = np.arange(len(windows))
    assert set(last) == set(INPUT_NAMES) - {"length"}
    for name, column in last.items():
        assert column.dtype == full[name].dtype and column.shape == (len(windows),)
        np.testing.assert_array_equal(column, full[name][rows, full["length"] - 1])


def _rewrite_metadata(path, **changes):
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    meta.update(changes)
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def test_a_folder_whose_graphs_disagree_is_refused(trained, tmp_path):
    _, gru = trained["gru"]
    _, dilated = trained["dilated"]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(gru, target)
        return target

    other_vocab = copy("other-vocab")
    _rewrite_metadata(other_vocab / STEP_FILE, vocab_hash="0123456789abcdef")
    with pytest.raises(ModelError, match="vocab_hash 0123456789abcdef but model.onnx has"):
        ModelScorer(other_vocab, provider="cpu")

    other_window = copy("other-window")
    _rewrite_metadata(other_window / STEP_FILE, window="50")
    with pytest.raises(ModelError, match="window 50 but model.onnx has 100"):
        ModelScorer(other_window, provider="cpu")

    other_shape = copy("other-shape")
    _rewrite_metadata(other_shape / STEP_FILE, state_shapes="1x32")
    with pytest.raises(ModelError, match="state_shapes 1x32 but model.onnx has 1x24"):
        ModelScorer(other_shape, provider="cpu")

    # both metadata agree with each other but not with the graphs
    lying = copy("lying")
    shapes = ModelScorer(gru, provider="cpu").session.get_modelmeta().custom_metadata_map["state_shapes"]
    lied = ",".join(["1x32"] + shapes.split(",")[1:])   # the GRU state first; others (models/context.py) kept
    _rewrite_metadata(lying / STEP_FILE, state_shapes=lied)
    _rewrite_metadata(lying / "model.onnx", state_shapes=lied)
    with pytest.raises(ModelError, match=r"state hidden is \(1, 24\), metadata says \(1, 32\)"):
        ModelScorer(lying, provider="cpu")

    missing = copy("missing")
    (missing / STEP_FILE).unlink()
    with pytest.raises(ModelError, match="model_step.onnx is missing"):
        ModelScorer(missing, provider="cpu")

    swapped = copy("swapped")
    shutil.copy(dilated / STEP_FILE, swapped / STEP_FILE)
    with pytest.raises(ModelError, match="model_kind dilated but model.onnx has gru"):
        ModelScorer(swapped, provider="cpu")

    no_shapes = copy("no-shapes")
    _rewrite_metadata(no_shapes / "model.onnx", state_shapes="")
    with pytest.raises(ModelError, match=r"names a step graph but lacks \['state_shapes'\]"):
        ModelScorer(no_shapes, provider="cpu")

    ModelScorer(copy("intact"), provider="cpu")   # the copies themselves are fine


def test_a_folder_exported_before_the_step_graph_still_serves_windows(trained, taobao, tmp_path):
    checkpoint, folder = trained["gru"]
    from training.checkpoint import load_checkpoint

    model, artefacts, _ = load_checkpoint(checkpoint)
    with np.load(checkpoint / "parity_inputs.npz") as data:
        example = {k: data[k][:2] for k in INPUT_NAMES}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    # the window graph and metadata exactly as `clickscore export` wrote them before
    write_onnx(LastPositionScorer(model).eval(), legacy / "model.onnx", example, 17, {
        "schema_version": "1", "window": str(WINDOW), "model_kind": "gru", "model_name": "old",
        "model_version": "1", "vocab_hash": artefacts.vocab_hash, "heads": "buy,next_item",
        "input_names": ",".join(INPUT_NAMES), "output_names": "buy_probability,next_item_scores",
        "n_items": str(artefacts.n_items), "created": "then"})
    artefacts.save(legacy / "features.json")
    old = ModelScorer(legacy, provider="cpu")
    new = ModelScorer(folder, provider="cpu")
    assert not old.supports_step and old.state_nbytes == 0
    frame = read_events(taobao)
    ids = list(frame["session_id"].unique(maintain_order=True)[:8])
    windows = []
    for events in session_events(frame, ids):
        window = empty_window()
        for event in events:
            window = append_event(window, event, artefacts)
        windows.append(window)
    assert_same_ranking(old.score(windows, top_k=20), new.score(windows, top_k=20))
    with pytest.raises(ModelError, match="no step graph"):
        old.score_step(windows, np.zeros((len(windows), 24), np.float32))
    # a step graph beside a window graph that names none comes from another export
    shutil.copy(folder / STEP_FILE, legacy / STEP_FILE)
    with pytest.raises(ModelError, match="names no step graph"):
        ModelScorer(legacy, provider="cpu")


def test_score_step_refuses_states_of_the_wrong_shape(trained, taobao):
    _, folder = trained["dilated"]
    scorer = ModelScorer(folder, provider="cpu")
    # 24 channels x (k-1) * (1+2+4+8+16+32) cached inputs, float32
    assert scorer.state_nbytes == 4 * 24 * 2 * 63
    frame = read_events(taobao)
    events = session_events(frame, [frame["session_id"][0]])[0]
    window = append_event(empty_window(), events[0], scorer.artefacts)
    with pytest.raises(ValueError, match=r"states must be float32 \(1, 3024\)"):
        scorer.score_step([window], np.zeros((1, 100), np.float32))


# -- the PyTorch models on their own (no export): step == forward ---------------------

@pytest.mark.parametrize("kind,extra", [("gru", {}), ("gru", {"num_layers": 2}), ("dilated", {}),
                                        ("dilated", {"kernel_size": 2, "dilations": (1, 2, 4, 8, 16, 32, 64)})])
def test_model_step_and_window_state_equal_forward(kind, extra):
    torch.manual_seed(0)
    model = build_model(kind, dict(n_items=50, n_categories=10, embedding_dim=16, hidden_dim=24, **extra)).eval()
    B, W = 3, WINDOW
    inputs = dict(event_type=torch.randint(1, 4, (B, W)), item=torch.randint(1, 50, (B, W)),
                  category=torch.randint(1, 10, (B, W)), hour=torch.randint(1, 25, (B, W)),
                  weekday=torch.randint(1, 8, (B, W)), month=torch.randint(1, 13, (B, W)),
                  week=torch.randint(1, 54, (B, W)), dwell=torch.randn(B, W), price=torch.randn(B, W))
    with torch.no_grad():
        buy, next_items = model(**inputs)                          # (B, W), (B, W, n_items)
        state = model.initial_state(B)
        assert [tuple(s.shape[1:]) for s in state] == list(model.state_shapes().values())
        for t in range(W):
            step_buy, step_next, state = model.step(*(v[:, t] for v in inputs.values()), state)
            torch.testing.assert_close(step_buy, buy[:, t], rtol=0, atol=TOLERANCE)
            torch.testing.assert_close(step_next, next_items[:, t], rtol=0, atol=TOLERANCE)
            if t in (0, 1, 37, W - 1):
                lengths = torch.tensor([t + 1, t + 1, t + 1])
                _, rebuilt = model.encode_with_state(**inputs, length=lengths)
                for a, b in zip(rebuilt, state):
                    torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE)
        _, empty = model.encode_with_state(**inputs, length=torch.zeros(B, dtype=torch.long))
        assert all(not s.any() for s in empty)                     # no event: the initial state
