"""What a person reads: the console table and the plots.

Plots use matplotlib's object-oriented API on an Agg canvas (``new_figure``), imported inside
the functions: nothing here touches pyplot's global state, so calling these from a notebook
does not switch its backend, and importing this module stays cheap. Every plot is written
atomically (``save_figure``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .workdir import atomic_path


# --------------------------------------------------------------------------- figures
def new_figure(figsize=(6.4, 4.8), dpi: int = 100):
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path``, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(ci, digits: int = 3) -> str:
    return "" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


# --------------------------------------------------------------------------- console
def format_report(report: dict) -> str:
    """The evaluation report as a plain-text table (what ``predict.py`` prints)."""
    classes = report["classes"]
    lines = [f"Test set: {report['n_test']} images"
             + (f" ({report['manifest']})" if report.get("manifest") else "")]
    lines.append(f"  accuracy  {_fmt(report['accuracy'])}  95% CI {_interval(report['accuracy_ci95'])}"
                 " (Wilson)")
    boot = report.get("bootstrap") or {}
    auc_ci = _interval(report.get("roc_auc_ci95"))
    lines.append(f"  ROC AUC   {_fmt(report['roc_auc'])}  "
                 + (f"95% CI {auc_ci} (bootstrap, {boot.get('valid', 0)} resamples, seed "
                    f"{boot.get('seed')})" if auc_ci else "(no bootstrap interval)")
                 + f"; positive class: {report['positive_class']}")
    lines.append("")
    width = max(8, *(len(c) for c in classes))
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    for name in classes:
        row = report["per_class"][name]
        lines.append(f"  {name:<{width}}  {_fmt(row['precision']):>9}  {_fmt(row['recall']):>6}  "
                     f"{_fmt(row['f1']):>5}  {row['support']:>7}")
    lines.append("")
    cm = report["confusion_matrix"]
    lines.append("  confusion matrix (rows: true label, columns: predicted label)")
    cell = max(7, *(len(c) for c in cm["order"]))
    lines.append(f"  {'':<{width}}  " + "  ".join(f"{c:>{cell}}" for c in cm["order"]))
    for name, row in zip(cm["order"], cm["counts"]):
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{v:>{cell}}" for v in row))
    groups = report.get("groups")
    if groups:
        lines.append("")
        lines.append(f"  groups ({groups['rule']}): accuracy and recall per class by group value")
        for attribute, table in groups["attributes"].items():
            lines.extend(_format_group_table(attribute, table, classes))
    return "\n".join(lines)


def _format_group_table(attribute: str, table: dict, classes: Sequence[str]) -> list[str]:
    width = max(10, len(attribute), *(len(v) for v in table))
    recall_heads = [f"recall {c} (n)" for c in classes]
    lines = ["", f"  {attribute:<{width}}  {'n':>5}  accuracy  {'95% CI':<14}  "
             + "  ".join(f"{h:>{max(9, len(h))}}" for h in recall_heads)]
    for value, row in table.items():
        recalls = []
        for c, head in zip(classes, recall_heads):
            text = f"{_fmt(row['recall'][c])} ({row['support'][c]})"
            recalls.append(f"{text:>{max(9, len(head))}}")
        lines.append(f"  {value:<{width}}  {row['n']:>5}  {_fmt(row['accuracy']):>8}  "
                     f"{_interval(row['accuracy_ci95'], 2):<14}  " + "  ".join(recalls))
    return lines


# --------------------------------------------------------------------------- plots
def plot_roc_curve(is_positive, scores, report: dict, path: str | os.PathLike) -> Path:
    """ROC curve of the positive class's probability, with the AUC and its interval."""
    from sklearn.metrics import roc_curve

    fig = new_figure((5.2, 5.0))
    ax = fig.add_subplot()
    is_positive = np.asarray(is_positive, dtype=bool)
    title = f"ROC curve (positive class: {report['positive_class']})"
    if is_positive.any() and not is_positive.all():
        fpr, tpr, _ = roc_curve(is_positive, np.asarray(scores, np.float64))
        label = f"AUC {report['roc_auc']:.3f}"
        if report.get("roc_auc_ci95"):
            label += f" (95% CI {_interval(report['roc_auc_ci95'])})"
        ax.plot(fpr, tpr, lw=2, label=label)
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "undefined: the test set holds one class only", ha="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_confusion_matrix(confusion: dict, path: str | os.PathLike) -> Path:
    """Counts and row percentages (the recall of each true class)."""
    order = confusion["order"]
    counts = np.asarray(confusion["counts"], dtype=np.int64)
    fig = new_figure((1.6 * len(order) + 2.4, 1.4 * len(order) + 1.8))
    ax = fig.add_subplot()
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(order)):
        for j in range(len(order)):
            ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.1%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(order)), yticks=range(len(order)), xticklabels=order, yticklabels=order,
           xlabel="predicted label", ylabel="true label", title="Confusion matrix (share of each true class)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def plot_errors(errors: Sequence[dict], classes: Sequence[str], path: str | os.PathLike,
                policy=None, columns: int = 6) -> Path:
    """A grid of misclassified images, most confident first, each with its probabilities.

    ``errors``: dicts with ``path`` (the image file), ``label``, ``predicted`` and ``probs``
    (one per class, ``classes`` order), already sorted and cut to the number to show. Images
    are shown as the network saw them (``images.load_image`` with ``policy``).
    """
    from .images import load_image

    if not errors:
        fig = new_figure((5, 1.5))
        fig.text(0.5, 0.5, "No misclassified test images.", ha="center", va="center", fontsize=12)
        return save_figure(fig, path)
    columns = min(columns, len(errors))
    rows = -(-len(errors) // columns)
    fig = new_figure((2.2 * columns, 3.0 * rows + 0.4))
    for k, item in enumerate(errors):
        ax = fig.add_subplot(rows, columns, k + 1)
        try:
            ax.imshow(load_image(item["path"], policy))
        except Exception:  # the report must not fail on a file that changed since prediction
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        probs = "  ".join(f"{c} {p:.3f}" for c, p in zip(classes, item["probs"]))
        ax.set_title(f"{Path(item['path']).name[:24]}\ntrue {item['label']}, "
                     f"predicted {item['predicted']}\n{probs}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"Most confidently misclassified test images ({len(errors)})", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_groups(groups: dict, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """One panel per attribute: accuracy (with its 95% interval) and per-class recall per value."""
    attributes = groups["attributes"]
    heights = [max(1.0, 0.45 * len(table) * (len(classes) + 1) / 2 + 0.8) for table in attributes.values()]
    fig = new_figure((7.5, sum(heights) + 0.6))
    spec = fig.add_gridspec(len(attributes), 1, height_ratios=heights)
    bar = 0.8 / (len(classes) + 1)
    for k, (attribute, table) in enumerate(attributes.items()):
        ax = fig.add_subplot(spec[k])
        values = list(table)
        y = np.arange(len(values))
        acc = np.array([table[v]["accuracy"] for v in values])
        lo = np.array([table[v]["accuracy_ci95"][0] for v in values])
        hi = np.array([table[v]["accuracy_ci95"][1] for v in values])
        ax.barh(y - 0.4 + bar / 2, acc, height=bar, color="black", alpha=0.75, label="accuracy",
                xerr=np.vstack([acc - lo, hi - acc]), error_kw={"lw": 0.8, "capsize": 2})
        for i, name in enumerate(classes):
            recall = np.array([np.nan if table[v]["recall"][name] is None else table[v]["recall"][name]
                               for v in values])
            ax.barh(y - 0.4 + bar * (i + 1.5), np.nan_to_num(recall), height=bar, label=f"recall {name}")
        ax.set_yticks(y, [f"{v} (n={table[v]['n']})" for v in values])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        ax.set_title(attribute, loc="left", fontsize=10)
        if k == len(attributes) - 1:
            ax.set_xlabel("share (accuracy: of the group; recall: of the group's images of that class)")
        ax.grid(axis="x", alpha=0.3)
        if k == 0:
            ax.legend(loc="lower left", fontsize=7, ncols=len(classes) + 1, bbox_to_anchor=(0, 1.08))
    fig.suptitle(f"Accuracy and recall by group ({groups['rule']})", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- training (train.py)
def plot_training_curves(history: dict, path: str | os.PathLike, best_epoch: int | None = None) -> Path:
    """Loss and accuracy per epoch, training vs validation; ``best_epoch`` (1-based) is marked.

    ``history``: Keras' ``History.history`` dict (``loss``, ``val_loss``, ``accuracy``,
    ``val_accuracy``, one value per epoch).
    """
    fig = new_figure((10.0, 4.0))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for k, (metric, title) in enumerate((("loss", "categorical cross-entropy"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(epochs, history[metric], marker="o", ms=3, label="training")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", ms=3, label="validation")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept (epoch {best_epoch})")
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
