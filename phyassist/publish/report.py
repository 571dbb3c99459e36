"""Read the evaluation stage's results table into (set, metric, value) scores for the card.

The table may be wide (one row per set and model, one column per metric) or long (``metric`` and
``value`` columns). Column names are matched loosely (case, spaces, ``-`` and ``_`` ignored) so a
renamed column in the evaluation stage does not silently drop the card's results: a table with
neither metric raises an error that lists the columns it found.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

SET_COLUMNS = ("set", "dataset", "dataset_name", "data_set", "task", "test_set")
MODEL_COLUMNS = ("model", "system", "variant", "run")
METRIC_COLUMNS = ("metric",)
VALUE_COLUMNS = ("value", "score")
# canonical metric -> normalised column names that mean it
METRICS = {
    "weighted_f1": ("weightedf1", "f1weighted", "wf1", "weightedf1x100", "officialweightedf1"),
    "bartscore": ("bartscore", "bart"),
}
SUMMARY_ROWS = {"mean", "average", "avg", "all", "overall", "macro", "total"}


class ReportError(ValueError):
    """The evaluation table cannot be read; the message names the file and the column."""


@dataclass(frozen=True)
class Score:
    set: str
    metric: str  # a key of METRICS
    value: float


def norm(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _find(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    targets = {norm(w) for w in wanted}
    return next((c for c in columns if norm(c) in targets), None)


def canonical_metric(name: str) -> str | None:
    n = norm(name)
    return next((m for m, names in METRICS.items() if n in names), None)


def _number(raw: object) -> float | None:
    """A finite float, or None for blanks and markers like 'n/a' (a metric the run could not compute)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_scores(path: Path, model_label: str = "finetuned") -> list[Score]:
    """Weighted F1 and BARTScore per set for the rows of ``model_label`` (all rows without a model column)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not a readable CSV table ({exc})") from None
    cols = list(df.columns)
    set_col = _find(cols, SET_COLUMNS)
    if set_col is None:
        raise ReportError(f"{path}: no set column (one of {', '.join(SET_COLUMNS)}); columns: {cols}")
    model_col = _find(cols, MODEL_COLUMNS)
    if model_col is not None:
        labels = sorted(set(df[model_col]))
        df = df[df[model_col].map(norm) == norm(model_label)]
        if df.empty:
            raise ReportError(f"{path}: no rows with {model_col}={model_label!r} (found {labels}); "
                              "set publish.eval_model to the label of the published adapter")
    metric_col, value_col = _find(cols, METRIC_COLUMNS), _find(cols, VALUE_COLUMNS)
    if metric_col and value_col:
        triples = [(r[set_col], canonical_metric(r[metric_col]), r[value_col]) for _, r in df.iterrows()]
    else:
        metric_cols = {c: canonical_metric(c) for c in cols if canonical_metric(c)}
        triples = [(r[set_col], m, r[c]) for _, r in df.iterrows() for c, m in metric_cols.items()]
    scores = [Score(str(s), m, v) for s, m, raw in triples
              if m is not None and norm(s) not in SUMMARY_ROWS and (v := _number(raw)) is not None]
    if not scores and not any(m for _, m, _ in triples):
        raise ReportError(f"{path}: no weighted F1 or BARTScore column (looked for "
                          f"{', '.join(sorted(METRICS))}); columns: {cols}")
    return scores
