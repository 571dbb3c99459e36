"""Score one set's generated answers with every configured metric; the majority baseline.

Label metrics come in each configured mode (official first), each with seeded bootstrap 95 %
intervals for weighted F1 and accuracy; a set without label rules gets text metrics only and a
``notice`` that says so.
"""

from __future__ import annotations

from typing import Sequence

from phyassist.evaluate.labels import (OFFICIAL, ROBUST, UNLABELLED, get_task, label_metrics, label_set,
                                       majority_label, parse_gold)
from phyassist.evaluate.metrics import check_pairs, text_metrics
from phyassist.evaluate.stats import RESAMPLES, SEED, bootstrap_ci, confusion

NO_LABELS = "label metrics skipped: the set defines no classes (give it 'classes' to get them)"


def label_scores(goldens: Sequence[str], generated: Sequence[str], task, mode: str,
                 resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Metrics of one set in one label mode, with intervals, the confusion matrix and the labels."""
    t = get_task(task)
    lab = label_set(goldens, generated, t, mode)
    out = label_metrics(lab.gold, lab.pred, t, lab.unlabelled)
    out["dropped_gold"] = lab.dropped_gold
    if resamples:
        out["ci"] = bootstrap_ci(lab.gold, lab.pred, t.classes, resamples=resamples, seed=seed)
    out["confusion"] = confusion(lab.gold, lab.pred, t.classes)
    out["labels"] = {"gold": lab.gold, "pred": lab.pred, "rows": lab.rows}
    return out


def flat_label_columns(mode: str, scores: dict) -> dict:
    """The table columns of one mode: ``<mode>_accuracy``, ``<mode>_weighted_f1_lo`` ..."""
    row = {f"{mode}_{k}": scores[k] for k in ("unlabelled", "accuracy", "weighted_f1", "micro_f1", "macro_f1")}
    for metric, (lo, hi) in scores.get("ci", {}).items():
        row[f"{mode}_{metric}_lo"], row[f"{mode}_{metric}_hi"] = lo, hi
    return row


def score_set(name: str, goldens: Sequence[str], generated: Sequence[str], ecfg,
              bart_scorer=None, task=None, classifier: str | None = None) -> dict:
    """Flat metrics row for one (system, set): labels per mode (and classifier when configured),
    BARTScore (when configured) and the text metrics. ``row["_labels"]`` keeps each mode's
    aligned labels and confusion matrix for the paired tests and plots (not a table column)."""
    check_pairs(generated, goldens, what=name)
    row: dict = {"set": name, "n": len(goldens)}
    if task is not None:
        t = get_task(task)
        row["_labels"] = {}
        for mode in ecfg.label_modes:
            s = label_scores(goldens, generated, t, mode, ecfg.bootstrap_resamples, ecfg.bootstrap_seed)
            row.update(flat_label_columns(mode, s))
            row["_labels"][mode] = {"gold": s["labels"]["gold"], "pred": s["labels"]["pred"],
                                    "confusion": s["confusion"], "dropped_gold": s["dropped_gold"]}
        clf_path = classifier
        if clf_path is None and ecfg.classifiers and t.name in _imhi_names():
            from phyassist.evaluate.tiny import resolve_classifier

            clf_path = resolve_classifier(ecfg.classifiers, t.name)
        if clf_path:
            from phyassist.evaluate.classifier import classify

            gold = parse_gold(list(goldens), t, ROBUST)
            keep = [i for i, g in enumerate(gold) if g != UNLABELLED]
            pred = classify([generated[i] for i in keep], t, clf_path, batch_size=ecfg.classifier_batch_size)
            clf = label_metrics([gold[i] for i in keep], pred, t)
            row.update({f"clf_{k}": clf[k] for k in ("accuracy", "weighted_f1", "micro_f1", "macro_f1")})
    else:
        row["notice"] = NO_LABELS
    if bart_scorer is not None:
        vals = bart_scorer.score(list(generated), list(goldens), batch_size=ecfg.bartscore_batch_size)
        row["bartscore"] = round(sum(vals) / len(vals), 4)
    tm = text_metrics(generated, goldens, ecfg.lang, ecfg.embedding_model, ecfg.zh_tokenizer, ecfg.cosine)
    row.update({k: v for k, v in tm.items() if k != "n"})
    return row


def _imhi_names() -> set[str]:
    from phyassist.evaluate.labels import TASKS

    return set(TASKS)


def majority_answers(task, goldens: Sequence[str]) -> list[str] | None:
    """Every answer = the label sentence of the set's most frequent gold class (no reasoning).

    None for sets without label rules.
    """
    if task is None:
        return None
    gold = parse_gold(list(goldens), task, OFFICIAL)
    top = majority_label([g for g in gold if g != UNLABELLED])
    sentence = next(str(g) for g, lab in zip(goldens, gold) if lab == top)
    return [sentence.split("Reasoning:")[0].strip()] * len(goldens)
