"""`clickscore tune`: hyperparameter search on the VALID split only (Optuna TPE).

    clickscore tune --data data/yoochoose --model gru --trials 20 --epochs 40 --out runs/tune-yc
    clickscore tune --data data/yoochoose-buys --objective buy_auc --trials 10 --timeout 1800 --out runs/tune-yb

Every trial is one `clickscore train --fit-on train` run (early stopping on valid) in
OUT/trial-NNN; its objective is the best epoch's valid figure (`--objective`: score =
train.py's early-stopping score, recall = next-item Recall@20, mrr = MRR@20, buy_auc).

Never reads test: the folder's train and valid rows are copied to OUT/train-valid/
(events.parquet filtered with a lazy scan, so the test rows are never materialised,
stats.json copied) and every trial trains on that copy; tests/test_tune.py checks it
with a folder that has no test rows and with a spy on the reader.

Writes OUT/trials.json and OUT/trials.csv (one row per trial: number, state, objective,
parameters, best epoch, seconds), rewritten after every trial so an interrupted search
keeps its log, and prints the command that fits the chosen configuration on
train+valid for its best epoch count (the train_full row of docs/results.md).

Why Optuna: a maintained, widely used optimiser with a seeded TPE sampler (the same
seed, the same proposals) and per-trial bookkeeping; a hand-written random search
would need the same and search worse.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from stream.errors import ClickscoreError

OBJECTIVES = {"score": "score", "recall": "recall@20", "mrr": "mrr@20", "buy_auc": "buy_roc_auc"}
# The space: the GRU4Rec recipe knobs (lr, dropout, batch, embedding/hidden size, weight
# decay) and the repeat head's form. Log-uniform where the scale is multiplicative.
SPACE = {
    "lr": ("float_log", 3e-4, 5e-3),
    "dropout": ("float", 0.0, 0.5),
    "batch_size": ("categorical", (32, 64, 128)),
    "embedding_dim": ("categorical", (32, 64, 96, 128)),
    "hidden_dim": ("categorical", (64, 96, 128, 192)),
    "weight_decay": ("float_log", 1e-6, 1e-2),
    "repeat_mode": ("categorical", ("mixture", "bonus")),
}


def train_valid_copy(data: Path, out: Path) -> Path:
    """OUT/train-valid: the prepared folder without its test rows (read lazily, filtered
    before anything is loaded). Returns the new folder."""
    import polars as pl

    source = data / "events.parquet"
    if not source.is_file():
        raise ClickscoreError(f"{source} not found: --data must be a folder written by `clickscore prepare`")
    target = out / "train-valid"
    target.mkdir(parents=True, exist_ok=True)
    frame = pl.scan_parquet(source).filter(pl.col("split").is_in(["train", "valid"])).collect()
    if frame.filter(pl.col("split") == "valid").height == 0:
        raise ClickscoreError(f"{data}: no valid split to tune on; re-run prepare with --valid-days")
    frame.write_parquet(target / "events.parquet")
    if (data / "stats.json").is_file():
        stats = json.loads((data / "stats.json").read_text())
        stats["tune_note"] = "test rows removed by clickscore tune"
        (target / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return target


def suggest(trial, space: dict = SPACE) -> dict:
    params = {}
    for name, spec in space.items():
        if spec[0] == "float_log":
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=True)
        elif spec[0] == "float":
            params[name] = trial.suggest_float(name, spec[1], spec[2])
        else:
            params[name] = trial.suggest_categorical(name, list(spec[1]))
    return params


def train_argv(args: argparse.Namespace, data: Path, out: Path, params: dict, fit_on: str = "train",
               epochs: int | None = None) -> list[str]:
    argv = ["train", "--data", str(data), "--model", args.model, "--out", str(out),
            "--epochs", str(epochs or args.epochs), "--seed", str(args.seed), "--fit-on", fit_on]
    if fit_on == "train":
        argv += ["--patience", str(args.patience)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    for name, value in params.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def write_log(out: Path, rows: list[dict]) -> None:
    (out / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = list(dict.fromkeys(k for row in rows for k in row if k != "params"))
    param_names = list(dict.fromkeys(k for row in rows for k in row.get("params", {})))
    with open(out / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names + param_names)
        for row in rows:
            writer.writerow([row.get(k) for k in names] + [row.get("params", {}).get(k) for k in param_names])


def tune(args: argparse.Namespace) -> dict:
    import optuna

    from stream.cli import build_parser
    from training.train import train

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.objective not in OBJECTIVES:
        raise ClickscoreError(f"--objective must be one of {sorted(OBJECTIVES)}")
    if args.trials < 1:
        raise ClickscoreError("--trials must be >= 1")
    tuning_data = train_valid_copy(data, out)
    key = OBJECTIVES[args.objective]
    rows: list[dict] = []
    parser = build_parser()

    def objective(trial) -> float:
        params = suggest(trial)
        trial_dir = out / f"trial-{trial.number:03d}"
        started = time.time()
        info = train(parser.parse_args(train_argv(args, tuning_data, trial_dir, params)))
        valid = info.get("best_valid") or {}
        value = valid.get(key)
        row = {"number": trial.number, "objective": args.objective, "value": value,
               "best_epoch": info["best_epoch"], "valid_recall@20": valid.get("recall@20"),
               "valid_mrr@20": valid.get("mrr@20"), "valid_buy_roc_auc": valid.get("buy_roc_auc"),
               "seconds": round(time.time() - started, 1), "params": params, "out": str(trial_dir)}
        rows.append(row)
        write_log(out, rows)
        if not args.keep_checkpoints:
            shutil.rmtree(trial_dir, ignore_errors=True)
        if value is None:
            raise optuna.TrialPruned(f"valid {key} undefined on this data")
        print(f"trial {trial.number}: valid {key} {value:.4f} (best epoch {info['best_epoch']}) {params}",
              file=sys.stderr)
        return float(value)

    optuna.logging.set_verbosity(optuna.logging.WARNING)   # one line per trial is printed above
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed),
                                study_name=f"clickscore-{data.name}")
    if args.start_from_defaults:   # the project defaults are trial 0: the search must beat them
        defaults = parser.parse_args(["train", "--data", ".", "--out", "."])
        study.enqueue_trial({name: getattr(defaults, name) for name in SPACE})
    study.optimize(objective, n_trials=args.trials, timeout=args.timeout or None,
                   show_progress_bar=sys.stderr.isatty())
    done = [r for r in rows if r["value"] is not None]
    if not done:
        raise ClickscoreError(f"no trial gave a valid {key} on {data}")
    best = max(done, key=lambda r: r["value"])
    final = train_argv(args, data, Path(str(args.out).rstrip("/") + "-train-valid"), best["params"],
                       fit_on="train+valid", epochs=max(int(best["best_epoch"]), 1))
    command = "clickscore " + shlex.join(final)
    summary = {"best": best, "objective": key, "trials": len(rows), "fit_command": command,
               "data": str(data), "tuned_on": "valid (test rows removed before training)"}
    (out / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"best trial {best['number']}: valid {key} {best['value']:.4f}, best epoch {best['best_epoch']}, "
          f"{best['params']}\ntrials log: {out / 'trials.json'}, {out / 'trials.csv'}\n"
          f"fit the chosen configuration on train+valid:\n  {command}")
    return summary


def run(args: argparse.Namespace) -> int:
    """CLI entry (stream/cli.py)."""
    tune(args)
    return 0
