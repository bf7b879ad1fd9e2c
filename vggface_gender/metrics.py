"""Evaluation metrics, from scikit-learn, with confidence intervals and group breakdowns.

Pure NumPy/scikit-learn: no TensorFlow, so the numbers can be recomputed from
``predictions.csv`` in a notebook. Labels are integer indices into ``classes``; probabilities
are an ``(n, n_classes)`` array in the same class order; the predicted label is the most
probable class (the first one on an exact tie, as ``argmax``).

Undefined values (an AUC with one class only, a recall with no example of that class) are
``None`` rather than NaN, so the JSON report stays valid JSON.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

UNKNOWN = "(unknown)"  # the group value of a file that the group rule does not cover


def _validate(y_true, probs, classes) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (n, {len(classes)}), got shape {probs.shape}")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(f"y_true must be ({probs.shape[0]},), got shape {y_true.shape}")
    if y_true.size == 0:
        raise ValueError("no examples to evaluate")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= len(classes):
        raise ValueError(f"y_true must hold class indices 0..{len(classes) - 1}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or infinite values")
    return y_true.astype(np.int64), probs


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (95% by default); ``None`` when ``n == 0``.

    Unlike the normal approximation it stays inside [0, 1] and behaves at 0% and 100%.
    """
    from scipy.stats import binomtest

    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def bootstrap_auc_interval(is_positive, scores, n_resamples: int, seed: int,
                           level: float = 0.95) -> dict:
    """Percentile bootstrap interval for ROC AUC.

    Draws ``n_resamples`` samples of the examples with replacement from
    ``np.random.default_rng(seed)`` (one row of ``n`` indices per resample); a resample holding
    one class only has no AUC and is skipped (``valid`` counts the rest). Each resample's AUC is
    the Mann-Whitney statistic from average ranks, the same number as scikit-learn's
    ``roc_auc_score`` (ties count half), computed for many resamples at once: 1000 resamples of
    500 examples take a fraction of a second rather than seconds.
    Returns ``{"ci": [lo, hi] | None, "resamples", "valid", "seed"}``.
    """
    from scipy.stats import rankdata

    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    out = {"ci": None, "resamples": int(n_resamples), "valid": 0, "seed": int(seed)}
    if n_resamples <= 0 or is_positive.all() or not is_positive.any():
        return out
    rng = np.random.default_rng(seed)
    n = is_positive.size
    rows_per_chunk = max(1, 4_000_000 // n)  # bounds memory: a few (rows, n) arrays at a time
    aucs = []
    for start in range(0, n_resamples, rows_per_chunk):
        idx = rng.integers(0, n, (min(rows_per_chunk, n_resamples - start), n))
        positive = is_positive[idx]
        n_pos = positive.sum(axis=1)
        n_neg = n - n_pos
        ranks = rankdata(scores[idx], axis=1)  # average ranks: a tie counts half
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = ((ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        aucs.append(auc[(n_pos > 0) & (n_neg > 0)])
    aucs = np.concatenate(aucs)
    out["valid"] = int(aucs.size)
    if aucs.size:
        tail = (1.0 - level) / 2 * 100
        lo, hi = np.percentile(aucs, [tail, 100 - tail])
        out["ci"] = [float(lo), float(hi)]
    return out


def classification_report(y_true, probs, classes: Sequence[str], positive_class: str,
                          n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every headline number of the report, as plain JSON-ready values.

    ``roc_auc`` uses the probability of ``positive_class`` as the score. The confusion matrix
    has true labels in rows and predicted labels in columns, both in ``classes`` order.
    """
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score)

    classes = list(classes)
    if positive_class not in classes:
        raise ValueError(f"positive class {positive_class!r} is not one of {classes}")
    y_true, probs = _validate(y_true, probs, classes)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    pos = classes.index(positive_class)

    n = int(y_true.size)
    correct = int((y_true == y_pred).sum())
    is_positive = y_true == pos
    both_classes = bool(is_positive.any() and not is_positive.all())
    auc = float(roc_auc_score(is_positive, probs[:, pos])) if both_classes else None
    bootstrap = bootstrap_auc_interval(is_positive, probs[:, pos], n_bootstrap, seed)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    predicted_counts = np.bincount(y_pred, minlength=len(classes))
    per_class = {}
    for i, name in enumerate(classes):
        per_class[name] = {
            # undefined (no example predicted / present) is None, not scikit-learn's 0
            "precision": float(precision[i]) if predicted_counts[i] else None,
            "recall": float(recall[i]) if support[i] else None,
            "f1": float(f1[i]) if support[i] or predicted_counts[i] else None,
            "support": int(support[i]),
        }
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "classes": classes,
        "positive_class": positive_class,
        "n_test": n,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "roc_auc": auc,
        "roc_auc_ci95": bootstrap["ci"],
        "bootstrap": {k: bootstrap[k] for k in ("resamples", "valid", "seed")},
        "per_class": per_class,
        "confusion_matrix": {
            "rows": "true label",
            "columns": "predicted label",
            "order": classes,
            "counts": matrix.astype(int).tolist(),
        },
    }


def group_breakdown(y_true, y_pred, values: Sequence[str], classes: Sequence[str],
                    order: Sequence[str] | None = None) -> dict:
    """Accuracy (with its Wilson interval) and per-class recall for every group value.

    ``values[i]`` is example ``i``'s group value (``UNKNOWN`` when the group rule does not
    cover it). Values are listed in ``order`` when given (values not in it follow), else in
    natural order ("9" before "10"), with ``UNKNOWN`` last.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    values = np.asarray([str(v) for v in values], dtype=object)
    if not (y_true.shape == y_pred.shape == values.shape):
        raise ValueError("y_true, y_pred and values must have the same length")
    out = {}
    for value in _ordered(set(values.tolist()), order):
        mask = values == value
        t, p = y_true[mask], y_pred[mask]
        n, correct = int(mask.sum()), int((t == p).sum())
        support = {name: int((t == i).sum()) for i, name in enumerate(classes)}
        recall = {name: (float(((t == i) & (p == i)).sum() / support[name]) if support[name] else None)
                  for i, name in enumerate(classes)}
        out[value] = {"n": n, "accuracy": correct / n, "accuracy_ci95": list(wilson_interval(correct, n)),
                      "recall": recall, "support": support}
    return out


def _ordered(found: set, order: Sequence[str] | None) -> list[str]:
    def natural(v: str):
        return (v == UNKNOWN, [(0, int(t), "") if t.isdigit() else (1, 0, t)
                               for t in _split_digits(v)])

    known = [v for v in (order or []) if v in found and v != UNKNOWN]
    rest = sorted((v for v in found if v not in known), key=natural)
    return known + [v for v in rest if v != UNKNOWN] + ([UNKNOWN] if UNKNOWN in found else [])


def _split_digits(text: str) -> list[str]:
    return [t for t in re.split(r"(\d+)", text) if t]
