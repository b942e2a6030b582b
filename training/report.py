"""Markdown report of one `clickscore evaluate` run, plots as PNGs beside it.

    clickscore evaluate --model onnx_models/default --data data/diginetica --report reports/diginetica.md

Writes PATH.md and, when the split has buy labels, PATH-roc.png, PATH-pr.png and
PATH-calibration.png (model and aggregate-feature baselines on the same prefixes).
"""
from __future__ import annotations

from pathlib import Path


from training import metrics


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(pair) -> str:
    return "-" if not pair else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _plots(evaluation, stem: Path) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = evaluation.buy_labels
    curves = evaluation.buy_probabilities
    files = {}

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, probability in curves.items():
        fpr, tpr = metrics.roc_curve(labels, probability)
        ax.plot(fpr, tpr, label=f"{name} (AUC {_num(metrics.roc_auc(labels, probability), 3)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Buy: ROC over prefixes")
    ax.legend(loc="lower right", fontsize=8)
    files["roc"] = _save(fig, stem, "roc")

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, probability in curves.items():
        recall, precision = metrics.precision_recall_curve(labels, probability)
        ax.step(recall, precision, where="post",
                label=f"{name} (AP {_num(metrics.pr_auc(labels, probability), 3)})")
    ax.axhline(labels.mean(), color="grey", linestyle=":", linewidth=1, label="buy rate")
    ax.set(xlabel="recall", ylabel="precision", title="Buy: precision-recall over prefixes",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right", fontsize=8)
    files["pr"] = _save(fig, stem, "pr")

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, probability in curves.items():
        predicted, observed, _ = metrics.calibration_curve(labels, probability)
        ax.plot(predicted, observed, marker="o",
                label=f"{name} (ECE {_num(metrics.expected_calibration_error(labels, probability), 3)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="mean predicted buy probability (10 bins)", ylabel="observed buy rate",
           title="Buy: calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    files["calibration"] = _save(fig, stem, "calibration")
    return files


def _save(fig, stem: Path, kind: str) -> str:
    path = stem.with_name(f"{stem.name}-{kind}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def render(summary: dict, figures: dict[str, str]) -> str:
    model, data = summary["model"], summary["data"]
    baselines = summary.get("baselines", {})
    lines = [
        f"# Evaluation: {model['name']} ({model['kind']}, v{model['version']}) on "
        f"{data['dataset']} [{data['split']}]",
        "",
        f"{summary['n_test_sessions']:,} sessions, {summary['n_test_events']:,} events, "
        f"{summary['n_positive_sessions']:,} buying sessions with a pre-purchase prefix; "
        f"{summary['n_buy_examples']:,} buy examples (prefixes before the first transaction), "
        f"{summary['n_next_item_examples']:,} next-item examples. Bootstrap: "
        f"{summary['bootstrap']['resamples']} resamples of sessions.",
        "",
        "## Next item (full catalogue, no sampled negatives)",
        "",
        "| scorer | Recall@20 | MRR@20 |",
        "|---|---|---|",
        f"| model | {_num(summary['recall_at_20'])} | {_num(summary['mrr_at_20'])} |",
    ]
    for name in ("popular", "sknn"):
        if name in baselines:
            b = baselines[name]
            lines.append(f"| {name} | {_num(b['recall_at_20'])} | {_num(b['mrr_at_20'])} |")
    oov = summary["test_targets_oov_share"]
    lines += ["", f"Test targets outside the model's vocabulary (items unseen in training): "
                  f"{_num(None if oov is None else 100 * oov, 2)}%. They count as misses, for the "
                  "model and for the baselines (which miss items absent from their own training data).", ""]

    lines += ["## Buy prediction", "",
              "| scorer | ROC AUC | 95% CI | PR AUC | 95% CI | AUC@1 | AUC@3 | AUC@10 | ECE |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = [("model", summary)] + [(n, baselines[n]) for n in ("aggregates_gbm", "aggregates_logistic")
                                   if n in baselines]
    for name, b in rows:
        p = b.get("prefix_auc", {})
        lines.append(f"| {name} | {_num(b['auc'])} | {_ci(b['auc_ci95'])} | {_num(b['pr_auc'])} | "
                     f"{_ci(b['pr_auc_ci95'])} | {_num(p.get('1'))} | {_num(p.get('3'))} | "
                     f"{_num(p.get('10'))} | {_num(b['ece'])} |")
    lines.append("")
    if figures:
        lines += [f"![ROC]({figures['roc']}) ![precision-recall]({figures['pr']}) "
                  f"![calibration]({figures['calibration']})", ""]
    else:
        lines += ["No buy labels in this split: no buy plots.", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in summary.get("notes", [])] + [""]
    return "\n".join(lines)


def write_report(evaluation, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".md":
        path = path.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = evaluation.buy_labels
    has_labels = labels.size and 0 < labels.sum() < labels.size
    figures = _plots(evaluation, path.with_suffix("")) if has_labels else {}
    path.write_text(render(evaluation.summary, figures))
    return path
