"""`clickscore train --fit-on train+valid`: the valid sessions' examples are trained on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stream.cli import build_parser
from stream.errors import ClickscoreError
from training.examples import build_examples, fit_artefacts, read_events
from training.train import train

from tests.test_models import write_prepared


def _data(tmp_path):
    t0 = 1_700_000_000
    sessions = {
        "t1": [("view", "a", "x", 1.0, t0), ("view", "b", "x", 1.0, t0 + 5), ("view", "a", "x", 1.0, t0 + 9)],
        "t2": [("view", "b", "x", 2.0, t0 + 100), ("view", "c", "x", 2.0, t0 + 110)],
        "v1": [("view", "valid-only", "v", 5.0, t0 + 200), ("view", "a", "x", 1.0, t0 + 210),
               ("view", "valid-only", "v", 5.0, t0 + 220)],
        "v2": [("view", "c", "x", 2.0, t0 + 300), ("view", "b", "x", 2.0, t0 + 310)],
        "x1": [("view", "test-only", "t", 9.0, t0 + 400), ("view", "a", "x", 1.0, t0 + 410)],
    }
    split = {"t1": "train", "t2": "train", "v1": "valid", "v2": "valid", "x1": "test"}
    write_prepared(tmp_path / "d", sessions, split)
    return tmp_path / "d"


def test_train_plus_valid_examples_hold_the_valid_sessions(tmp_path):
    frame = read_events(_data(tmp_path))
    only = fit_artefacts(frame)
    both = fit_artefacts(frame, splits=("train", "valid"))
    assert "valid-only" not in only.items
    assert "valid-only" in both.items and "test-only" not in both.items   # test never fitted on
    with pytest.raises(ClickscoreError):
        fit_artefacts(frame, splits=("train", "test"))
    train_ex = build_examples(frame, "train", both)
    valid_ex = build_examples(frame, "valid", both)
    joint = build_examples(frame, ("train", "valid"), both)
    assert joint.n_sessions == train_ex.n_sessions + valid_ex.n_sessions == 4
    assert len(joint) == len(train_ex) + len(valid_ex)
    # the valid sessions' next-item targets (including the valid-only item) are trained on
    targets = joint.batch(np.arange(len(joint)))["next_target"]
    assert both.item_index("valid-only") in targets.tolist()[-2] + targets.tolist()[-1]
    expected = np.concatenate([train_ex.batch(np.arange(len(train_ex)), trim=False)["next_target"],
                               valid_ex.batch(np.arange(len(valid_ex)), trim=False)["next_target"]])
    assert np.array_equal(joint.batch(np.arange(len(joint)), trim=False)["next_target"], expected)


def _args(data, out, *extra):
    return build_parser().parse_args([
        "train", "--data", str(data), "--out", str(out), "--batch-size", "2", "--embedding-dim", "8",
        "--hidden-dim", "8", "--threads", "1", "--seed", "0", *extra])


def test_fit_on_train_plus_valid_trains_exactly_epochs_on_both_splits(tmp_path):
    data = _data(tmp_path)
    info = train(_args(data, tmp_path / "tv", "--fit-on", "train+valid", "--epochs", "3", "--patience", "1"))
    assert info["fit_on"] == "train+valid" and info["train_sessions"] == 4
    assert info["epochs"] == 3 and info["best_epoch"] == 3          # no early stopping, last epoch kept
    log = json.loads((tmp_path / "tv" / "train_log.json").read_text())
    assert log["fit_on"] == "train+valid" and len(log["epochs"]) == 3
    # two windows per step: 4 sessions -> 2 steps per epoch (train alone would be 1)
    assert log["steps"] == 6
    features = json.loads((tmp_path / "tv" / "features.json").read_text())
    assert "valid-only" in json.dumps(features) and "test-only" not in json.dumps(features)

    info = train(_args(data, tmp_path / "t", "--epochs", "1"))
    assert info["fit_on"] == "train" and info["train_sessions"] == 2
    assert "valid-only" not in (tmp_path / "t" / "features.json").read_text()
    assert torch.load(tmp_path / "tv" / "checkpoint.pt", weights_only=True)["train"]["fit_on"] == "train+valid"


def test_fit_on_flag_and_env(monkeypatch, tmp_path):
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o"]).fit_on == "train"
    monkeypatch.setenv("CLICKSCORE_TRAIN_FIT_ON", "train+valid")
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o"]).fit_on == "train+valid"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--fit-on", "test"])


def _buy_data(tmp_path):
    """Train and valid sessions with and without a transaction, so calibration has both classes."""
    t0 = 1_700_000_000
    sessions, split = {}, {}
    for i in range(24):
        name = f"s{i}"
        events = [("view", f"i{i % 5}", "x", 1.0 + i % 3, t0 + 1000 * i + 10 * j) for j in range(3)]
        if i % 3 == 0:
            events.append(("transaction", f"i{i % 5}", "x", 1.0, t0 + 1000 * i + 40))
        sessions[name] = events
        split[name] = "train" if i < 14 else ("valid" if i < 20 else "test")
    write_prepared(tmp_path / "b", sessions, split)
    return tmp_path / "b"


def test_fit_on_train_plus_valid_without_epochs_picks_them_on_a_held_out_run_first(tmp_path):
    data = _buy_data(tmp_path)
    out = tmp_path / "tv"
    info = train(_args(data, out, "--fit-on", "train+valid", "--patience", "2", "--stack-gbm", "false"))
    held_log = json.loads((out / "held-out" / "train_log.json").read_text())
    held_info = torch.load(out / "held-out" / "checkpoint.pt", weights_only=False)["train"]
    assert held_info["fit_on"] == "train" and held_log["best_epoch"] >= 1
    # stage 2 trains exactly the held-out run's best epoch count on both splits
    assert info["fit_on"] == "train+valid" and info["epochs"] == held_log["best_epoch"]
    assert info["train_sessions"] == 20 and held_info["train_sessions"] == 14
    assert info["held_out_run"]["best_epoch"] == held_log["best_epoch"]
    # the calibration is the held-out run's (fitted on valid while valid was held out), not refitted
    assert held_info["calibration"] is not None
    assert info["calibration"]["scale"] == held_info["calibration"]["scale"]
    assert info["calibration"]["shift"] == held_info["calibration"]["shift"]
    assert "held-out run" in info["calibration"]["fit_on"]
    config = torch.load(out / "checkpoint.pt", weights_only=False)["config"]
    assert config["calibration_scale"] == held_info["calibration"]["scale"]
    # the recorded command is the user's (no --epochs): the model card's rebuild line reruns both stages
    assert info["args"]["epochs"] is None and info["args"]["fit_on"] == "train+valid"


def test_epochs_below_one_is_refused(tmp_path):
    with pytest.raises(ClickscoreError, match="--epochs must be >= 1"):
        train(_args(_data(tmp_path), tmp_path / "x", "--epochs", "0"))


def test_refit_stacks_the_gbm_refitted_on_both_splits_with_the_held_out_blend(tmp_path):
    data = _buy_data(tmp_path)
    out = tmp_path / "tv"
    info = train(_args(data, out, "--fit-on", "train+valid", "--patience", "2"))
    held = torch.load(out / "held-out" / "checkpoint.pt", weights_only=False)["train"]["stack"]
    assert held and held["kept"]
    # the GBM is refitted on the train+valid prefixes (more rows) with the held-out parameters...
    assert info["stack"]["gbm_params"] == held["gbm_params"]
    assert info["stack"]["train_rows"] > held["train_rows"]
    # ...with the held-out run's feature choices and blend weights; only the intercept is
    # refitted, on out-of-fold train+valid scores (train.refit_intercept), so the refit's mean
    # prediction matches the base rate of its own training prefixes
    stack = info["stack"]
    assert stack["features"] == held["features"] and stack["oov_distinct"] == held["oov_distinct"]
    assert stack["held_out_blend"] == held["blend"]
    assert (stack["blend"]["gbm"], stack["blend"]["gru"]) == (held["blend"]["gbm"], held["blend"]["gru"])
    icpt = stack["intercept"]
    assert stack["blend"]["bias"] == icpt["bias"] and icpt["held_out_bias"] == held["blend"]["bias"]
    assert abs(icpt["mean_probability"] - icpt["prefix_rate"]) < 0.01     # the log-loss intercept's first-order condition
    config = torch.load(out / "checkpoint.pt", weights_only=False)["config"]
    assert list(config["stack_blend"]) == [held["blend"]["gbm"], held["blend"]["gru"], icpt["bias"]]
    assert config["stack_trees"] > 0
