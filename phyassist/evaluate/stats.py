"""Label statistics: F1 from a confusion matrix, seeded bootstrap intervals, paired bootstrap tests.

F1 is computed from integer-coded confusion matrices with numpy (the same numbers as scikit-learn's
``f1_score`` with its default labels: every class present in gold or predictions; tests check this),
so 1,000 resamples of a 2,441-answer set take well under a second.

Bootstrap: resample the answers of a set with replacement (``n`` of ``n``) ``resamples`` times
from ``numpy.random.default_rng(seed)``, recompute the metric on each, and report the 2.5th and
97.5th percentiles (a 95 % percentile interval). The paired test resamples the same rows for both
systems, so it measures the difference on the same answers; its p-value is the share of resamples
in which the fine-tuned system is not better (one-sided).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from phyassist.evaluate.labels import UNLABELLED

RESAMPLES, SEED, LEVEL = 1000, 0, 95


def encode(gold: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Integer codes over ``classes`` (+ UNLABELLED and any stray prediction, after them)."""
    names = list(classes)
    for p in list(gold) + list(pred):
        if p not in names:
            names.append(p)
    idx = {c: i for i, c in enumerate(names)}
    return np.array([idx[g] for g in gold]), np.array([idx[p] for p in pred]), names


def _confusion(g: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k)


def _scores_from_confusion(cm: np.ndarray, scored: np.ndarray) -> dict:
    """accuracy, weighted/micro/macro F1 (fractions) over the classes flagged in ``scored``."""
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1).astype(float), cm.sum(axis=0).astype(float)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = scored & (denom > 0)
    n = cm.sum()
    acc = tp.sum() / n
    w = support[present]
    return {"accuracy": acc,
            "weighted_f1": float((f1[present] * w).sum() / w.sum()) if w.sum() else 0.0,
            "micro_f1": acc,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


def f1_scores(gold: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> dict:
    """accuracy, weighted/micro/macro F1 ×100 over the classes present in gold or predictions
    (UNLABELLED is never a class: it only costs recall and accuracy)."""
    g, p, names = encode(gold, pred, classes)
    cm = _confusion(g, p, len(names))
    scored = np.array([n != UNLABELLED for n in names])
    return {k: 100 * float(v) for k, v in _scores_from_confusion(cm, scored).items()}


def confusion(gold: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> dict:
    """{"labels": row/column names, "matrix": counts[gold][pred]}; UNLABELLED appears as a
    prediction column only when some answer was unlabelled."""
    g, p, names = encode(gold, pred, classes)
    cm = _confusion(g, p, len(names))
    return {"labels": names, "matrix": cm.tolist()}


def _resample_metric(g, p, k, scored, idx, metric):
    out = np.empty(len(idx))
    for r, rows in enumerate(idx):
        out[r] = _scores_from_confusion(_confusion(g[rows], p[rows], k), scored)[metric]
    return 100 * out


def resample_rows(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``resamples`` × ``n`` row indices drawn with replacement (the same for every system)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(gold, pred, classes, metrics=("weighted_f1", "accuracy"), resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = LEVEL) -> dict:
    """{metric: [low, high]} percentile intervals (×100, 2 decimals)."""
    g, p, names = encode(gold, pred, classes)
    scored = np.array([n != UNLABELLED for n in names])
    idx = resample_rows(len(g), resamples, seed)
    lo, hi = (100 - level) / 2, 100 - (100 - level) / 2
    out = {}
    for m in metrics:
        vals = _resample_metric(g, p, len(names), scored, idx, m)
        out[m] = [round(float(np.percentile(vals, lo)), 2), round(float(np.percentile(vals, hi)), 2)]
    return out


def paired_bootstrap(gold, pred_a, pred_b, classes, metric: str = "weighted_f1",
                     resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Is system b better than system a on the same answers?

    Returns the observed difference b - a (×100), its 95 % interval and ``p``: the share of
    resamples in which b is not better than a (small p: b's advantage is not a resampling accident).
    """
    if not (len(gold) == len(pred_a) == len(pred_b)):
        raise ValueError(f"paired bootstrap: {len(gold)} gold, {len(pred_a)} and {len(pred_b)} predictions")
    names = list(dict.fromkeys([*classes, *gold, *pred_a, *pred_b]))  # one class index for both systems
    g, pa, _ = encode(gold, pred_a, names)
    _, pb, _ = encode(gold, pred_b, names)
    scored = np.array([n != UNLABELLED for n in names])
    k = len(names)
    full = np.arange(len(g))[None, :]
    observed = (_resample_metric(g, pb, k, scored, full, metric) - _resample_metric(g, pa, k, scored, full, metric))[0]
    idx = resample_rows(len(g), resamples, seed)
    diff = _resample_metric(g, pb, k, scored, idx, metric) - _resample_metric(g, pa, k, scored, idx, metric)
    return {"metric": metric, "difference": round(float(observed), 2),
            "ci": [round(float(np.percentile(diff, 2.5)), 2), round(float(np.percentile(diff, 97.5)), 2)],
            "p": round(float((diff <= 0).mean()), 4), "resamples": resamples, "seed": seed}
