"""Score one set's generated answers with every configured metric; the majority baseline."""

from __future__ import annotations

from typing import Sequence

from phyassist.evaluate.labels import TASKS, UNLABELLED, label_metrics, majority_label, parse_labels
from phyassist.evaluate.metrics import check_pairs, text_metrics


def score_set(name: str, goldens: Sequence[str], generated: Sequence[str], ecfg,
              bart_scorer=None) -> dict:
    """Flat metrics row for one (system, set): labels (rule; classifier when configured),
    BARTScore (when configured) and the text metrics."""
    check_pairs(generated, goldens, what=name)
    row: dict = {"set": name, "n": len(goldens)}
    if name in TASKS:
        gold = parse_labels(list(goldens), name)
        rule = label_metrics(gold, parse_labels(list(generated), name), name)
        row.update({k: rule[k] for k in ("unlabelled", "accuracy", "weighted_f1", "micro_f1", "macro_f1")})
        if ecfg.classifiers:
            from phyassist.evaluate.classifier import classify
            from phyassist.evaluate.tiny import resolve_classifier

            pred = classify(generated, name, resolve_classifier(ecfg.classifiers, name),
                            batch_size=ecfg.classifier_batch_size)
            clf = label_metrics(gold, pred, name)
            row.update({f"clf_{k}": clf[k] for k in ("accuracy", "weighted_f1", "micro_f1", "macro_f1")})
    if bart_scorer is not None:
        vals = bart_scorer.score(list(generated), list(goldens), batch_size=ecfg.bartscore_batch_size)
        row["bartscore"] = round(sum(vals) / len(vals), 4)
    tm = text_metrics(generated, goldens, ecfg.lang, ecfg.embedding_model, ecfg.zh_tokenizer, ecfg.cosine)
    row.update({k: v for k, v in tm.items() if k != "n"})
    return row


def majority_answers(name: str, goldens: Sequence[str]) -> list[str] | None:
    """Every answer = the label sentence of the set's most frequent gold class (no reasoning).

    None for sets without a known label scheme.
    """
    if name not in TASKS:
        return None
    gold = parse_labels(list(goldens), name)
    top = majority_label([g for g in gold if g != UNLABELLED])
    sentence = next(str(g) for g, lab in zip(goldens, gold) if lab == top)
    return [sentence.split("Reasoning:")[0].strip()] * len(goldens)
