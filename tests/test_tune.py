"""`clickscore tune`: Optuna trials on valid only; the test split is never read; the
trials log is written and the train+valid command printed.

    .venv/bin/python -m pytest tests/test_tune.py -q
"""
from __future__ import annotations

import csv
import json
import shlex

import polars as pl
import pytest

from stream.cli import build_parser, main
from stream.errors import ClickscoreError
from training import train as train_module

TINY = ["--trials", "2", "--epochs", "1", "--max-steps", "3", "--threads", "1"]


@pytest.fixture()
def spy_reader(monkeypatch):
    """Records the splits of every frame training reads."""
    seen: list[set] = []
    real = train_module.read_events

    def spy(path):
        frame = real(path)
        seen.append(set(frame["split"].unique().to_list()))
        return frame

    monkeypatch.setattr(train_module, "read_events", spy)
    return seen


def test_tune_trains_on_train_and_valid_only_and_logs_every_trial(yoochoose, tmp_path, spy_reader, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(yoochoose), "--out", str(out), *TINY]) == 0
    assert spy_reader and all(splits <= {"train", "valid"} for splits in spy_reader)
    assert all("valid" in splits for splits in spy_reader)
    rows = json.loads((out / "trials.json").read_text())
    assert [r["number"] for r in rows] == [0, 1]
    assert all(r["value"] is not None and 0 <= r["value"] <= 1 for r in rows)
    with open(out / "trials.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    best = json.loads((out / "best.json").read_text())
    command = shlex.split(best["fit_command"])
    assert command[:2] == ["clickscore", "train"] and "--fit-on" in command
    assert command[command.index("--fit-on") + 1] == "train+valid"
    assert command[command.index("--data") + 1] == str(yoochoose)      # the real folder for the final fit
    assert "fit the chosen configuration on train+valid" in capsys.readouterr().out
    # trial 0 is the project defaults
    defaults = build_parser().parse_args(["train", "--data", ".", "--out", "."])
    assert rows[0]["params"] == {name: getattr(defaults, name) for name in rows[0]["params"]}


def test_tune_works_on_a_folder_that_has_no_test_rows(yoochoose, tmp_path, spy_reader):
    folder = tmp_path / "no-test"
    folder.mkdir()
    frame = pl.read_parquet(yoochoose / "events.parquet")
    frame.filter(pl.col("split") != "test").write_parquet(folder / "events.parquet")
    (folder / "stats.json").write_text((yoochoose / "stats.json").read_text())
    assert main(["tune", "--data", str(folder), "--out", str(tmp_path / "t"), *TINY]) == 0
    assert (tmp_path / "t" / "best.json").is_file()


def test_tune_refuses_a_folder_without_valid_rows(yoochoose, tmp_path):
    folder = tmp_path / "no-valid"
    folder.mkdir()
    pl.read_parquet(yoochoose / "events.parquet").filter(pl.col("split") == "train").write_parquet(
        folder / "events.parquet")
    with pytest.raises(ClickscoreError, match="no valid split to tune on"):
        from training.tune import train_valid_copy
        train_valid_copy(folder, tmp_path / "t")
