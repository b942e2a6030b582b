"""The model card's rebuild line for `prepare` repeats every option that shapes the split
(a random split's seed and share, a buys file and its complete range), so running it
makes the same prepared data."""
from __future__ import annotations

import json
import shlex

import polars as pl

from stream.cli import main
from training.export import prepare_command


def test_rebuild_line_of_a_random_split_makes_the_same_data(datasets, tmp_path):
    source = datasets / "rees46" / "2019-Oct-head.csv"
    first = tmp_path / "first"
    assert main(["prepare", "--dataset", "rees46", "--input", str(source), "--split", "random",
                 "--split-seed", "3", "--random-split-share", "0.25", "--out", str(first)]) == 0
    stats = json.loads((first / "stats.json").read_text())
    line = prepare_command(stats, str(tmp_path / "again"))
    argv = shlex.split(line)
    assert argv[:2] == ["clickscore", "prepare"]
    assert "--split" in argv and argv[argv.index("--split") + 1] == "random"
    assert main(argv[1:]) == 0
    a = pl.read_parquet(first / "events.parquet")
    b = pl.read_parquet(tmp_path / "again" / "events.parquet")
    assert a.equals(b)
    # a different seed would have split differently: the seed in the line is what made them equal
    assert argv[argv.index("--split-seed") + 1] == "3"


def test_rebuild_line_carries_the_buys_options():
    stats = {"dataset": "yoochoose", "input": "in", "split_method": "published",
             "buys": "../b.dat", "complete_buys_below": 22000}
    argv = shlex.split(prepare_command(stats, "out"))
    assert argv[argv.index("--buys") + 1] == "../b.dat"
    assert argv[argv.index("--complete-buys-below") + 1] == "22000"
    assert "--split" not in argv
