"""Session models and training examples: causality, receptive field, shapes, loss masks,
artefacts fitted on train only, reproducible training (real prepared data)."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from stream.cli import build_parser
from stream.features import ITEM_OOV, WINDOW, FeatureArtefacts
from training.examples import IGNORE, build_examples, fit_artefacts, read_events
from training.export import LastPositionScorer
from training.models import build_model
from training.models.dilated import DilatedConfig
from training.train import MODEL_INPUTS, train

torch.set_num_threads(1)
KINDS = ("gru", "dilated")


def tiny_config(kind: str, n_items: int = 50, n_categories: int = 10) -> dict:
    return dict(n_items=n_items, n_categories=n_categories, embedding_dim=16, hidden_dim=24, dropout=0.0)


def random_inputs(B: int, W: int, n_items: int = 50, n_categories: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ints = lambda high: torch.randint(1, high, (B, W), generator=g)  # noqa: E731
    return {"event_type": ints(4), "item": ints(n_items), "category": ints(n_categories), "hour": ints(25),
            "weekday": ints(8), "month": ints(13), "week": ints(54),
            "dwell": torch.randn(B, W, generator=g), "price": torch.randn(B, W, generator=g)}


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_at_a_position_never_depend_on_later_positions(kind):
    torch.manual_seed(0)
    model = build_model(kind, tiny_config(kind)).eval()
    inputs = random_inputs(3, WINDOW)
    changed = {k: v.clone() for k, v in inputs.items()}
    t = 37
    for name, value in changed.items():   # change every input at t and after
        if value.dtype == torch.int64:
            value[:, t:] = (value[:, t:] % 3) + 1
        else:
            value[:, t:] += 5.0
    with torch.no_grad():
        buy, nxt = model(**inputs)
        buy2, nxt2 = model(**changed)
    torch.testing.assert_close(buy[:, :t], buy2[:, :t], rtol=0, atol=1e-6)
    torch.testing.assert_close(nxt[:, :t], nxt2[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(buy[:, t:], buy2[:, t:])   # the change is visible where it may be


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_full_window_and_trimmed(kind):
    model = build_model(kind, tiny_config(kind)).eval()
    for W in (WINDOW, 7):
        buy, nxt = model(**random_inputs(2, W))
        assert buy.shape == (2, W) and nxt.shape == (2, W, 50)


def test_dilated_receptive_field_covers_the_window():
    config = DilatedConfig(**tiny_config("dilated"))
    assert config.receptive_field == 1 + 2 * (1 + 2 + 4 + 8 + 16 + 32) >= WINDOW
    with pytest.raises(AssertionError, match="receptive field"):
        DilatedConfig(**tiny_config("dilated"), dilations=(1, 2, 4))
    # Empirically: the last position of a full window still sees the first event.
    torch.manual_seed(0)
    model = build_model("dilated", tiny_config("dilated")).eval()
    inputs = random_inputs(1, WINDOW)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["item"][0, 0] = 1 + changed["item"][0, 0] % 40
    with torch.no_grad():
        assert model(**inputs)[0][0, -1] != model(**changed)[0][0, -1]


@pytest.mark.parametrize("kind", KINDS)
def test_export_wrapper_reads_position_length_minus_one(kind):
    model = build_model(kind, tiny_config(kind)).eval()
    inputs = random_inputs(4, WINDOW)
    length = torch.tensor([1, 17, 99, 100])
    with torch.no_grad():
        buy, nxt = model(**inputs)
        p, scores = LastPositionScorer(model)(*inputs.values(), length)
    rows = torch.arange(4)
    torch.testing.assert_close(p, torch.sigmoid(buy[rows, length - 1]))
    torch.testing.assert_close(scores, nxt[rows, length - 1])


# -- examples ------------------------------------------------------------------------

def write_prepared(folder, sessions: dict[str, list[tuple]], split_of: dict[str, str]) -> None:
    """sessions: id -> [(event_type, item, category, price, ts_seconds)]."""
    rows = [dict(session_id=sid, event_type=e, item_id=i, category_id=c, price=p, timestamp=int(ts * 1000),
                 user_id=None, event_id=None, split=split_of[sid])
            for sid, events in sessions.items() for (e, i, c, p, ts) in events]
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema_overrides={"user_id": pl.String, "event_id": pl.String}).write_parquet(
        folder / "events.parquet")
    (folder / "stats.json").write_text(json.dumps({"dataset": "handmade"}))


def test_loss_masks_stop_at_first_transaction_and_skip_oov(tmp_path):
    t0 = 1_700_000_000
    sessions = {
        "buyer": [("view", "a", "x", 1.0, t0), ("addtocart", "b", "x", 2.0, t0 + 5),
                  ("view", "zzz", None, None, t0 + 9), ("transaction", "b", "x", 2.0, t0 + 20),
                  ("view", "a", "x", 1.0, t0 + 30)],
        "browser": [("view", "b", "y", 3.0, t0 + 100), ("view", "a", "x", None, t0 + 110)],
        "later": [("view", "zzz", "q", 1.0, t0 + 200), ("view", "a", "x", 1.0, t0 + 210)],
    }
    split = {"buyer": "train", "browser": "train", "later": "valid"}
    write_prepared(tmp_path / "d", sessions, split)
    frame = read_events(tmp_path / "d")
    artefacts = fit_artefacts(frame, min_item_count=2)
    assert set(artefacts.items) == {"a", "b"}          # "zzz": once in train, so OOV at min count 2
    ex = build_examples(frame, "train", artefacts)
    assert len(ex) == 2 and ex.n_sessions == 2
    batch = ex.batch(np.arange(2))
    a, b = artefacts.item_index("a"), artefacts.item_index("b")
    # buyer: buy loss at the 3 events before the first transaction, label 1
    assert batch["buy_mask"][0].tolist() == [True, True, True, False, False]
    assert batch["buy_target"][0, :3].tolist() == [1.0, 1.0, 1.0]
    # next item = item of t+1; the OOV target ("zzz", event 2) is skipped
    assert batch["next_target"][0].tolist() == [b, IGNORE, b, a, IGNORE]
    assert batch["buy_mask"][1].tolist() == [True, True, False, False, False]
    assert batch["buy_target"][1, :2].tolist() == [0.0, 0.0]
    assert batch["item"][0, 2] == ITEM_OOV


def test_vocabulary_fitted_on_train_split_only(tmp_path):
    t0 = 1_700_000_000
    sessions = {"s1": [("view", "a", "x", 1.0, t0), ("view", "b", "x", 1.0, t0 + 1)],
                "s2": [("view", "valid-only", "v", 99.0, t0 + 50), ("view", "a", "x", 1.0, t0 + 60)]}
    write_prepared(tmp_path / "d", sessions, {"s1": "train", "s2": "valid"})
    artefacts = fit_artefacts(read_events(tmp_path / "d"))
    assert artefacts.items == ("a", "b") and artefacts.categories == ("x",)
    assert artefacts.price_mean == pytest.approx(np.log1p(1.0))


def test_long_session_gets_one_window_per_later_event(tmp_path):
    t0 = 1_700_000_000
    n = WINDOW + 30
    events = [("view", f"i{k % 7}", "x", 1.0, t0 + 10 * k) for k in range(n)]
    events[WINDOW + 10] = ("transaction", "i3", "x", 1.0, t0 + 10 * (WINDOW + 10))
    write_prepared(tmp_path / "d", {"long": events}, {"long": "train"})
    frame = read_events(tmp_path / "d")
    ex = build_examples(frame, "train", fit_artefacts(frame))
    # main window + one per later event t = 100..128 (t = 129 has no next item and is after the buy)
    assert len(ex) == 1 + (n - 1 - WINDOW)
    assert ex.window_length.tolist() == [WINDOW] * len(ex)
    extra = ex.batch(np.arange(1, len(ex)), trim=False)
    assert not extra["buy_mask"][:, :-1].any() and (extra["next_target"][:, :-1] == IGNORE).all()
    # buy loss at the last position only while before the transaction at event 110
    assert extra["buy_mask"][:, -1].tolist() == [t < WINDOW + 10 for t in range(WINDOW, n - 1)]
    # the extra window ending at event t holds events t-99..t: its first row is event t-99
    assert extra["dwell"].shape == (len(ex) - 1, WINDOW)
    assert ex.window_start[1:].tolist() == [t - WINDOW + 1 for t in range(WINDOW, n - 1)]


# -- training on real prepared data ---------------------------------------------------

def train_args(data, out, kind="gru", seed=0, steps=4, extra=()):
    return build_parser().parse_args([
        "train", "--data", str(data), "--out", str(out), "--model", kind, "--seed", str(seed),
        "--max-steps", str(steps), "--epochs", "1", "--batch-size", "32", "--embedding-dim", "16",
        "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "300", "--min-item-count", "2",
        *extra])


def state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights_other_seed_other_weights(yoochoose, tmp_path, kind):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(train_args(yoochoose, tmp_path / name, kind, seed))
    a, b, c = state(tmp_path / "a"), state(tmp_path / "b"), state(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # training moved the weights (a run that does nothing would pass the equality above)
    torch.manual_seed(0)   # train seeds torch, then builds the model: the same initial weights
    init = build_model(kind, torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["config"])
    assert not torch.equal(init.state_dict()["heads.to_item_space.weight"], a["heads.to_item_space.weight"])
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["steps"] == 4 and log["best_valid"]["recall@20"] is not None
    assert log["best_valid"]["buy_roc_auc"] is None   # yoochoose-100k has no buys: undefined, not NaN
    features = FeatureArtefacts.load(tmp_path / "a" / "features.json")
    assert features.vocab_hash == torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["train"]["vocab_hash"]


def test_training_reduces_next_item_loss_on_real_data(yoochoose, tmp_path):
    train(train_args(yoochoose, tmp_path / "r", "gru", 0, steps=60, extra=["--lr", "0.01"]))
    log = json.loads((tmp_path / "r" / "train_log.json").read_text())
    # a model that learned nothing ranks the next item at chance: R@20 ~ 20 / 2,900 items
    assert log["best_valid"]["recall@20"] > 0.05


def test_inputs_of_model_inputs_are_the_encoded_names():
    assert MODEL_INPUTS == ("event_type", "item", "category", "hour", "weekday", "month", "week",
                            "dwell", "price")


# -- heads that read the window (training/models/context.py) -------------------------

CONTEXT_VARIANTS = [{"repeat": True, "wide": True, "item_rates": True}, {"repeat": True, "repeat_mode": "bonus"},
                    {"wide": True}, {"repeat": True, "wide": True, "calibration_scale": 0.7,
                                     "calibration_shift": -0.4},
                    # item-neighbour mixture (training/models/neighbours.py), a random table loaded below
                    {"repeat": True, "wide": True, "neighbours": 6, "neighbour_window": 4, "neighbour_mix": 0.4},
                    {"repeat": True, "neighbours": 6, "neighbour_window": 3, "neighbour_mix": 0.3,
                     "neighbour_mode": "output"},
                    {"repeat": True, "repeat_mode": "bonus", "neighbours": 6, "neighbour_mix": 0.2},
                    # session-neighbour mixture (training/models/sessions.py), an index fitted below
                    {"repeat": True, "wide": True, "neighbours": 6, "neighbour_window": 4, "neighbour_mix": 0.4,
                     "session_neighbours": 5, "session_rows": 31, "session_posting": 8, "session_length": 6,
                     "session_window": 7, "session_mix": 0.3},
                    {"wide": True, "session_neighbours": 40, "session_rows": 31, "session_posting": 3,
                     "session_length": 4, "session_mix": 0.5}]


@pytest.mark.parametrize("extra", CONTEXT_VARIANTS)
def test_context_heads_are_causal_and_step_exactly(extra):
    torch.manual_seed(0)
    model = build_model("gru", dict(tiny_config("gru"), **extra))
    with torch.no_grad():   # untrained recency/gate parameters are zeros: make them matter
        for p in model.context.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if model.neighbours is not None:
        rng = np.random.default_rng(0)
        weights = rng.random((50, 6)).astype(np.float32)
        weights[:2] = 0.0                                          # padding and OOV rows are empty
        model.neighbours.load_table((rng.integers(2, 50, (50, 6)).astype(np.int32), weights))
    if model.sessions is not None:   # 30 random training sessions over the 50 items
        from training.models.sessions import SessionIndexParams, fit_session_index

        rng = np.random.default_rng(1)
        lengths = rng.integers(1, 12, 30)
        c = model.config
        index = fit_session_index(np.repeat(np.arange(30), lengths), rng.integers(1, 50, lengths.sum()),
                                  rng.random(lengths.sum()).cumsum() * 3600.0, 50,
                                  SessionIndexParams(posting=c.session_posting, length=c.session_length))
        model.sessions.load_index(index)
    assert_causal_and_steps_exactly(model, extra)


@pytest.mark.parametrize("extra", [{"repeat": True, "wide": True, "item_rates": True}, {}],
                         ids=["defaults", "plain"])
def test_stacked_buy_head_is_causal_and_steps_exactly(extra):
    """The in-graph LightGBM + blend (training/models/stack.py) on the window heads and on a plain GRU."""
    from tests.test_stack import stacked_gru

    model = stacked_gru(**extra)
    if model.context is not None:
        with torch.no_grad():
            for p in model.context.parameters():
                p.add_(0.3 * torch.randn_like(p))
    assert model.state_names[-1] == "stack_window"
    assert_causal_and_steps_exactly(model, extra)


@pytest.mark.parametrize("stacked", [False, True], ids=["gru", "stacked"])
def test_window_heads_give_the_same_outputs_trimmed_or_padded(stacked):
    """Training trims a batch to its longest window; serving pads to W. The outputs at the
    real positions must not depend on which (the running maxima were once unfloored at
    the last position of a trimmed batch: learned propensities and normalised dwell can be
    negative)."""
    from tests.test_stack import stacked_gru

    extra = {"repeat": True, "wide": True, "item_rates": True}
    model = stacked_gru(**extra) if stacked else build_model("gru", dict(tiny_config("gru"), **extra))
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.context.item_buy.weight[1:].sub_(1.0)                  # negative propensities
    model.eval()
    L = 17
    inputs = random_inputs(3, WINDOW)
    padded = {k: v.clone() for k, v in inputs.items()}
    for v in padded.values():
        v[:, L:] = 0
    with torch.no_grad():
        buy_full, next_full = model(**padded)
        buy_trim, next_trim = model(**{k: v[:, :L] for k, v in inputs.items()})
    torch.testing.assert_close(buy_trim, buy_full[:, :L], rtol=0, atol=1e-5)
    torch.testing.assert_close(next_trim, next_full[:, :L], rtol=0, atol=1e-5)


def assert_causal_and_steps_exactly(model, extra):
    model.eval()
    inputs = random_inputs(3, WINDOW)
    inputs["item"][:, 10:20] = inputs["item"][:, :10]          # repeats, so the copy path is used
    changed = {k: v.clone() for k, v in inputs.items()}
    t = 37
    changed["item"][:, t:] = (changed["item"][:, t:] % 3) + 1
    changed["event_type"][:, t:] = 3
    with torch.no_grad():
        buy, nxt = model(**inputs)                                 # (B, W), (B, W, n_items)
        buy2, nxt2 = model(**changed)
        torch.testing.assert_close(buy[:, :t], buy2[:, :t], rtol=0, atol=1e-6)
        torch.testing.assert_close(nxt[:, :t], nxt2[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(nxt[:, t:], nxt2[:, t:])
        if model.neighbours is not None:   # the neighbour table moves the scores (not a no-op path)
            mix, model.config.neighbour_mix = model.config.neighbour_mix, 0.0
            without = model(**inputs)[1]
            model.config.neighbour_mix = mix
            assert not torch.allclose(without, nxt, atol=1e-3)
        if model.sessions is not None:     # so does the session index
            mix, model.config.session_mix = model.config.session_mix, 0.0
            without = model(**inputs)[1]
            model.config.session_mix = mix
            assert not torch.allclose(without, nxt, atol=1e-3)
        if extra.get("repeat") and extra.get("repeat_mode", "mixture") == "mixture":
            # the mixture is a distribution: log-scores sum to 1 in probability
            torch.testing.assert_close(torch.logsumexp(nxt, dim=-1), torch.zeros(3, WINDOW), rtol=0, atol=1e-4)
        state = model.initial_state(3)
        assert [tuple(s.shape[1:]) for s in state] == list(model.state_shapes().values())
        for step in range(WINDOW):
            step_buy, step_next, state = model.step(*(v[:, step] for v in inputs.values()), state)
            torch.testing.assert_close(step_buy, buy[:, step], rtol=0, atol=1e-5)
            torch.testing.assert_close(step_next, nxt[:, step], rtol=0, atol=1e-5)
            if step in (0, 14, WINDOW - 1):
                length = torch.full((3,), step + 1)
                outputs = model.score_last(*inputs.values(), length)
                torch.testing.assert_close(outputs[0], torch.sigmoid(buy[:, step]), rtol=0, atol=1e-5)
                torch.testing.assert_close(outputs[1], nxt[:, step], rtol=0, atol=1e-5)
                for a, b in zip(outputs[2:], state):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # one batch of different lengths (the worker's case): each row as forward() at its own position
        lengths = torch.tensor([1, 37, WINDOW])
        mixed = model.score_last(*inputs.values(), lengths)
        rows = torch.arange(3)
        torch.testing.assert_close(mixed[0], torch.sigmoid(buy[rows, lengths - 1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[1], nxt[rows, lengths - 1], rtol=0, atol=1e-5)
        empty = model.score_last(*inputs.values(), torch.zeros(3, dtype=torch.long))[2:]
        assert all(not s.any() for s in empty)                     # no event: the initial state


def test_repeat_head_ranks_a_session_item_above_the_catalogue_when_its_gate_opens():
    torch.manual_seed(0)
    model = build_model("gru", dict(tiny_config("gru"), repeat=True)).eval()
    with torch.no_grad():
        model.context.gate.bias.fill_(8.0)                         # gate ~1: copy distribution only
    inputs = random_inputs(1, 5)
    inputs["item"][0] = torch.tensor([7, 9, 7, 11, 13])
    with torch.no_grad():
        _, nxt = model(**inputs)
    top = set(torch.topk(nxt[0, -1], 4).indices.tolist())
    assert top == {7, 9, 11, 13}


def test_platt_fit_recovers_known_scaling():
    from training.train import fit_platt

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    scale, shift = fit_platt(z, y)
    assert abs(scale - 0.5) < 0.05 and abs(shift + 1.0) < 0.08
    assert fit_platt(z, np.zeros_like(z)) is None                # one class: nothing to fit
