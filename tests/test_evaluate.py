"""`clickscore evaluate` end to end: real data prepared with `clickscore prepare`, a
small model trained and exported with `clickscore train` / `clickscore export`, then
evaluated through the CLI, as a user would."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN

TRAIN_SMALL = ["--max-steps", "30", "--epochs", "1", "--threads", "1",
               "--embedding-dim", "16", "--hidden-dim", "16"]


def clickscore(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "clickscore"), *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"clickscore {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def prepared_model(root: Path, datasets: Path, dataset: str, folder: str) -> tuple[Path, Path, Path]:
    """(prepared folder, checkpoint folder, exported folder) for one real dataset."""
    data, run, model = root / f"data-{dataset}", root / f"run-{dataset}", root / f"onnx-{dataset}"
    clickscore("prepare", "--dataset", dataset, "--input", str(datasets / folder), "--out", str(data))
    clickscore("train", "--data", str(data), "--out", str(run), *TRAIN_SMALL)
    clickscore("export", "--checkpoint", str(run), "--out", str(model))
    return data, run, model


@pytest.fixture(scope="module")
def diginetica(tmp_path_factory, datasets):
    return prepared_model(tmp_path_factory.mktemp("eval"), datasets, "diginetica", "diginetica")


@pytest.fixture(scope="module")
def yoochoose(tmp_path_factory, datasets):
    return prepared_model(tmp_path_factory.mktemp("eval"), datasets, "yoochoose", "yoochoose-100k")


def evaluate_json(model: Path, data: Path, *extra: str) -> dict:
    proc = clickscore("evaluate", "--model", str(model), "--data", str(data), "--json",
                      "--bootstrap", "200", "--threads", "1", *extra)
    return json.loads(proc.stdout)


def unit(value) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def test_evaluate_real_buy_labels(diginetica, tmp_path):
    data, _, model = diginetica
    report = tmp_path / "report" / "diginetica.md"
    result = evaluate_json(model, data, "--report", str(report))
    stats = json.loads((data / "stats.json").read_text())

    assert result["data"] == {**result["data"], "dataset": "diginetica", "split": "test"}
    assert result["model"]["kind"] == "gru" and result["model"]["name"] == model.name
    assert result["n_test_sessions"] == stats["splits"]["test"]["sessions"]
    assert result["n_test_events"] == stats["splits"]["test"]["events"]
    assert 0 < result["n_positive_sessions"] <= stats["splits"]["test"]["buying_sessions"]
    for key in ("auc", "pr_auc", "ece", "recall_at_20", "mrr_at_20", "test_targets_oov_share"):
        assert unit(result[key]), key
    for key in ("auc", "pr_auc"):
        low, high = result[f"{key}_ci95"]
        assert 0.0 <= low <= result[key] <= high <= 1.0
    assert set(result["prefix_auc"]) == {"1", "3", "10"}
    assert unit(result["prefix_auc"]["1"])
    assert result["mrr_at_20"] <= result["recall_at_20"]
    # Diginetica's small sample: most test items are unseen in training, and they are misses.
    assert result["recall_at_20"] <= 1.0 - result["test_targets_oov_share"]

    baselines = result["baselines"]
    assert set(baselines) == {"popular", "sknn", "vsknn", "stan", "vstan", "sr", "aggregates_gbm",
                              "aggregates_logistic"}
    for name in ("popular", "sknn"):
        assert unit(baselines[name]["recall_at_20"]) and unit(baselines[name]["mrr_at_20"])
    assert baselines["sknn"]["recall_at_20"] > baselines["popular"]["recall_at_20"]
    for name in ("aggregates_gbm", "aggregates_logistic"):
        block = baselines[name]
        assert unit(block["auc"]) and unit(block["pr_auc"]) and unit(block["ece"])
        assert block["auc_ci95"][0] <= block["auc"] <= block["auc_ci95"][1]
        assert set(block["prefix_auc"]) == {"1", "3", "10"}

    # paired model - baseline differences on the same examples, best baselines named
    paired = result["paired"]
    assert set(paired["next_item"]) == {"sknn", "vsknn", "stan", "vstan", "sr"}
    assert paired["next_item_best"] in paired["next_item"]
    for name, diff in paired["next_item"].items():
        assert diff["recall_diff"] == pytest.approx(result["recall_at_20"] - baselines[name]["recall_at_20"])
        low, high = diff["recall_diff_ci95"]
        assert low <= diff["recall_diff"] <= high
    assert paired["buy_best"] in ("aggregates_gbm", "aggregates_logistic")
    for name in ("aggregates_gbm", "aggregates_logistic"):
        diff = paired["buy"][name]
        assert diff["auc_diff"] == pytest.approx(result["auc"] - baselines[name]["auc"])
        assert diff["auc_diff_ci95"][0] <= diff["auc_diff"] <= diff["auc_diff_ci95"][1]

    text = report.read_text()
    assert "count as misses" in text and "| sknn |" in text and "aggregates_gbm" in text
    for kind in ("roc", "pr", "calibration"):
        png = report.with_name(f"diginetica-{kind}.png")
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_scores_equal_exported_scores(diginetica):
    data, run, model = diginetica
    exported = evaluate_json(model, data, "--baselines", "false", "--bootstrap", "0")
    checkpoint = evaluate_json(run, data, "--baselines", "false", "--bootstrap", "0")
    assert checkpoint["model"]["format"] == "checkpoint" and exported["model"]["format"] == "onnx"
    for key in ("auc", "pr_auc", "ece", "recall_at_20", "mrr_at_20", "test_targets_oov_share"):
        assert checkpoint[key] == pytest.approx(exported[key], abs=1e-4), key
    assert "baselines" not in exported and exported["auc_ci95"] is None


def test_evaluate_without_buys_gives_null_buy_metrics(yoochoose):
    data, _, model = yoochoose
    result = evaluate_json(model, data)
    assert result["n_test_events"] == 13568 and result["n_test_sessions"] == 3416
    assert result["n_positive_sessions"] == 0
    for key in ("auc", "pr_auc", "auc_ci95", "pr_auc_ci95", "ece"):
        assert result[key] is None, key
    assert result["prefix_auc"] == {"1": None, "3": None, "10": None}
    assert any("buy metrics are null" in note for note in result["notes"])
    assert unit(result["recall_at_20"]) and unit(result["test_targets_oov_share"])
    # SKNN on session-rec's yoochoose-100k split is a strong baseline.
    assert result["baselines"]["sknn"]["recall_at_20"] > 0.4
    assert result["baselines"]["aggregates_gbm"]["auc"] is None


def test_refuses_data_of_another_dataset(diginetica, yoochoose):
    _, _, model = diginetica
    data, _, _ = yoochoose
    proc = clickscore("evaluate", "--model", str(model), "--data", str(data), "--json", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'diginetica'" in proc.stderr and "'yoochoose'" in proc.stderr
    assert "same dataset" in proc.stderr


def test_refuses_a_foreign_vocabulary_even_without_dataset_names(diginetica, yoochoose):
    import polars as pl

    from stream.errors import ClickscoreError
    from training.evaluate import check_fit, load_model, load_prepared

    _, _, model_dir = diginetica
    data, _, _ = yoochoose
    model = load_model(model_dir, threads=1)
    model.dataset = None                       # as an exporter that records no dataset
    events, stats = load_prepared(data)
    test = events.filter(pl.col("split") == "test")
    with pytest.raises(ClickscoreError, match=r"knows 0\.0% of the items"):
        check_fit(model, test, {**stats, "dataset": None}, str(data))
    # The model's own data passes and reports its unknown-item share.
    own, own_stats = load_prepared(diginetica[0])
    share = check_fit(model, own.filter(pl.col("split") == "test"), own_stats, "diginetica")
    assert 0.0 < share < 0.9


def test_tune_gbm_picks_the_best_valid_auc_of_its_grid():
    """The LightGBM grid search scores every grid point on valid and returns the best."""
    from training.baselines import tune_gbm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=1200) > 1.0).astype(int)     # signal in column 0
    grid = {"num_leaves": (3, 7), "n_estimators": (5, 50)}
    best, trials = tune_gbm(x[:800], y[:800], x[800:], y[800:], seed=0, grid=grid)
    assert len(trials) == 4 and {tuple(t["params"].items()) for t in trials} == {
        (("num_leaves", a), ("n_estimators", b)) for a in (3, 7) for b in (5, 50)}
    assert best == max(trials, key=lambda t: t["valid_auc"])["params"]
    assert max(t["valid_auc"] for t in trials) > 0.8


def test_paired_intervals_are_zero_for_a_scorer_against_itself_and_above_zero_for_a_better_one():
    from training import metrics

    rng = np.random.default_rng(0)
    sessions = np.repeat(np.arange(300), 4)                          # 4 targets per session
    ranks = rng.integers(1, 60, sessions.size).astype(float)
    same = metrics.paired_next_item_ci(sessions, ranks, ranks, n_resamples=200)
    assert same["recall_diff"] == 0 and same["recall_diff_ci95"] == [0.0, 0.0]
    better = np.where(rng.random(sessions.size) < 0.3, 1.0, ranks)   # 30% of targets moved to rank 1
    diff = metrics.paired_next_item_ci(sessions, better, ranks, n_resamples=200)
    assert diff["recall_diff_ci95"][0] > 0 and diff["mrr_diff_ci95"][0] > 0

    labels = (rng.random(sessions.size) < 0.2).astype(float)
    noise = rng.random(sessions.size)
    informative = labels + rng.normal(0, 0.5, sessions.size)
    auc = metrics.paired_auc_ci(sessions, labels, informative, noise, n_resamples=200)
    assert auc["auc_diff"] == pytest.approx(metrics.roc_auc(labels, informative) - metrics.roc_auc(labels, noise))
    assert auc["auc_diff_ci95"][0] > 0
    flat = metrics.paired_auc_ci(sessions, labels, noise, noise, n_resamples=50)
    assert flat["auc_diff"] == 0 and flat["auc_diff_ci95"] == [0.0, 0.0]


def test_results_tables_show_paired_intervals_and_replace_only_their_section(tmp_path):
    from training.results import BEGIN, END, tables, write_between_markers

    summary = {"recall_at_20": 0.7, "mrr_at_20": 0.38, "auc": 0.81, "auc_ci95": [0.78, 0.84], "ece": 0.012,
               "n_positive_sessions": 166, "valid": {"recall@20": 0.62, "mrr@20": 0.34, "buy_roc_auc": 0.77},
               "baselines": {"vstan": {"recall_at_20": 0.68, "mrr_at_20": 0.37},
                             "aggregates_gbm": {"auc": 0.79, "auc_ci95": [0.76, 0.82], "ece": 0.02}},
               "paired": {"next_item_best": "vstan", "buy_best": "aggregates_gbm",
                          "next_item": {"vstan": {"recall_diff": 0.02, "recall_diff_ci95": [0.01, 0.03],
                                                  "mrr_diff": 0.01, "mrr_diff_ci95": [0.002, 0.018]}},
                          "buy": {"aggregates_gbm": {"auc_diff": 0.02, "auc_diff_ci95": [0.005, 0.035]}}}}
    text = tables({"yoochoose-buys": summary})
    assert "| yoochoose-buys | 0.7000 | 0.3800 | vstan |" in text
    assert "+0.0200 [0.010, 0.030]" in text and "+0.0200 [0.005, 0.035]" in text
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\nkept above\n{BEGIN}\nold\n{END}\nkept below\n")
    write_between_markers(doc, text)
    content = doc.read_text()
    assert content.startswith("# Results\nkept above\n") and content.endswith("kept below\n")
    assert "old" not in content and "| yoochoose-buys |" in content
