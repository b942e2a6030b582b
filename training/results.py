"""Regenerate the model-vs-baseline tables of docs/results.md from the shared data.

    make results                                   # = the line below
    .venv/bin/python -m training.results --work reports/results --write docs/results.md
    .venv/bin/python -m training.results --only yoochoose-buys --work reports/results   # one dataset

For each dataset below, as a user would run it, with the project defaults:
  clickscore prepare ...                                       (the documented command)
  clickscore train --data D --out R/DATA --fit-on train+valid  (stage 1: --fit-on train into
      R/DATA/held-out, early stopping and the valid-fitted steps; stage 2: refit on train+valid
      for its best epoch count)
  clickscore export --checkpoint R/DATA --out O/DATA
  clickscore evaluate --model O/DATA --data D --json --report REPORT.md   (test; baselines on train+valid)
Each step is skipped when its output already exists, so an interrupted run resumes;
delete --work to start over. The tables are written between the markers
`<!-- results:begin -->` and `<!-- results:end -->` of --write (nothing else in the
file changes). Every figure carries its 95% session-bootstrap interval and, against the
best baseline of the same run, the paired bootstrap interval of the difference
(training/evaluate.py `paired`). The test split chooses nothing: defaults come from
`clickscore tune` runs on valid (docs/experiments-log.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHARED = "../shared/datasets"
DATASETS = {
    "yoochoose": ["--dataset", "yoochoose", "--input", f"{SHARED}/yoochoose-100k"],
    "yoochoose-buys": ["--dataset", "yoochoose", "--input", f"{SHARED}/yoochoose-100k", "--buys",
                       f"{SHARED}/yoochoose-raw/yoochoose-buys.dat", "--complete-buys-below", "22000"],
    "taobao": ["--dataset", "taobao", "--input", f"{SHARED}/taobao-userbehavior"],
    "rees46": ["--dataset", "rees46", "--input", f"{SHARED}/rees46/2019-Oct-head.csv", "--split", "random"],
    "diginetica": ["--dataset", "diginetica", "--input", f"{SHARED}/diginetica"],
}
# Per-dataset `clickscore train` options beside the defaults: the buy datasets pick the
# epoch by valid buy AUC (it peaks before Recall@20, docs/experiments-log.md); Taobao's
# 44k-item softmax is cut to items seen 3+ times (72% of its test events are unseen anyway).
TRAIN_ARGS = {
    "yoochoose": [],
    "yoochoose-buys": ["--select-on", "buy_auc"],
    "taobao": ["--select-on", "buy_auc", "--min-item-count", "3"],
    "rees46": ["--select-on", "buy_auc"],
    "diginetica": ["--select-on", "buy_auc"],
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def clickscore(*argv: str) -> None:
    command = [str(Path(sys.executable).parent / "clickscore"), *argv]
    print("+ clickscore " + " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def run_dataset(name: str, work: Path, threads: int, extra_train: list[str]) -> dict:
    data, runs, onnx, reports = work / "data" / name, work / "runs", work / "onnx", work / "reports"
    if not (data / "events.parquet").is_file():
        clickscore("prepare", *DATASETS[name], "--out", str(data))
    # one command: `--fit-on train+valid` without --epochs runs the early-stopped --fit-on
    # train stage into FULL/held-out first (epoch count, calibration, blend, neighbour mix
    # chosen on valid), then refits on train+valid (training/train.py train_refit)
    full = runs / name
    held_out = full / "held-out"
    if not (full / "checkpoint.pt").is_file():
        clickscore("train", "--data", str(data), "--out", str(full), "--fit-on", "train+valid",
                   "--threads", str(threads), *extra_train)
    best_epoch = max(1, int(json.loads((held_out / "train_log.json").read_text())["best_epoch"]))
    if not (onnx / name / "model.onnx").is_file():
        clickscore("export", "--checkpoint", str(full), "--out", str(onnx / name))
    result = reports / f"{name}.json"
    if not result.is_file():
        reports.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([str(Path(sys.executable).parent / "clickscore"), "evaluate", "--model",
                              str(onnx / name), "--data", str(data), "--threads", str(threads), "--json",
                              "--report", str(reports / f"{name}.md")], check=True, capture_output=True, text=True)
        result.write_text(out.stdout)
    summary = json.loads(result.read_text())
    summary["valid"] = json.loads((held_out / "train_log.json").read_text()).get("best_valid")
    summary["best_epoch"] = best_epoch
    return summary


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(pair, digits: int = 3) -> str:
    return "" if not pair else f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _with_ci(value, pair) -> str:
    return f"{_num(value)} {_ci(pair)}".rstrip()


def _diff(value, pair) -> str:
    return "-" if value is None else f"{value:+.4f} {_ci(pair)}"


def tables(results: dict[str, dict]) -> str:
    lines = ["Generated by `make results` (training/results.py); model = `clickscore train` defaults, "
             "fitted on train+valid (`--fit-on train+valid`: the best epoch count and the valid-fitted "
             "choices of its early-stopped train-only stage), "
             "exported to ONNX and scored by `clickscore evaluate` on test. Baselines fitted on "
             "train+valid in the same run. [95% session bootstrap]; diff = model - baseline with the "
             "paired session-bootstrap interval.", "",
             "### next item (Recall@20 / MRR@20)", "",
             "| data | model R@20 | model MRR@20 | best kNN baseline | its R@20 / MRR@20 | R@20 diff | "
             "MRR@20 diff | vs VSTAN R@20 diff | vs VSTAN MRR@20 diff | valid R@20 / MRR@20 (train-only run) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        paired = s.get("paired") or {}
        best = paired.get("next_item_best")
        if s.get("recall_at_20") is None or not best:
            continue
        b, d = s["baselines"][best], paired["next_item"][best]
        v = paired["next_item"].get("vstan") or {}
        valid = s.get("valid") or {}
        lines.append(f"| {name} | {_with_ci(s['recall_at_20'], s.get('recall_at_20_ci95'))} | "
                     f"{_with_ci(s['mrr_at_20'], s.get('mrr_at_20_ci95'))} | {best} | "
                     f"{_with_ci(b['recall_at_20'], b.get('recall_at_20_ci95'))} / "
                     f"{_with_ci(b['mrr_at_20'], b.get('mrr_at_20_ci95'))} | "
                     f"{_diff(d['recall_diff'], d['recall_diff_ci95'])} | {_diff(d['mrr_diff'], d['mrr_diff_ci95'])} | "
                     f"{_diff(v.get('recall_diff'), v.get('recall_diff_ci95'))} | "
                     f"{_diff(v.get('mrr_diff'), v.get('mrr_diff_ci95'))} | "
                     f"{_num(valid.get('recall@20'))} / {_num(valid.get('mrr@20'))} |")
    lines += ["", "### buy (ROC AUC on every pre-purchase prefix; ECE through the exported ONNX)", "",
              "| data | buying test sessions | model AUC [95% CI] | model ECE | best aggregate baseline | "
              "its AUC [95% CI] | its ECE | AUC diff [paired 95% CI] | valid AUC (train-only run) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        paired = s.get("paired") or {}
        best = paired.get("buy_best")
        if s.get("auc") is None or not best:
            continue
        b, d = s["baselines"][best], paired["buy"][best]
        valid = s.get("valid") or {}
        lines.append(f"| {name} | {s['n_positive_sessions']} | {_num(s['auc'])} {_ci(s['auc_ci95'])} | "
                     f"{_num(s['ece'], 3)} | {best} | {_num(b['auc'])} {_ci(b['auc_ci95'])} | {_num(b['ece'], 3)} | "
                     f"{_diff(d['auc_diff'], d['auc_diff_ci95'])} | {_num(valid.get('buy_roc_auc'))} |")
    lines += ["", "Reliability plots: reports/results/reports/DATA-calibration.png (written by `evaluate --report`)."]
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> None:
    content = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        content = head + block + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n## Generated results\n\n" + block + "\n"
    path.write_text(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="reports/results", help="folder for data, runs, models, reports")
    parser.add_argument("--write", help="markdown file whose generated section is replaced (docs/results.md)")
    parser.add_argument("--only", action="append", choices=sorted(DATASETS), help="datasets to run (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads")
    parser.add_argument("--train-arg", action="append", default=[],
                        help="extra `clickscore train` argument (repeatable, e.g. --train-arg=--epochs=60)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    results = {}
    for name in args.only or list(DATASETS):
        results[name] = run_dataset(name, work, args.threads, TRAIN_ARGS[name] + args.train_arg)
    text = tables(results)
    (work / "results.md").write_text(text + "\n")
    print(text)
    if args.write:
        write_between_markers(Path(args.write), text)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
