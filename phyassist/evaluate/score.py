"""``python -m phyassist score --input preds.jsonl --output scores.json [--task DR] [--lang zh]``

Scores a file of ``prediction``/``reference`` records (JSON lines), or a MentalLLaMA output CSV
(``goldens, generated_text``), with every metric that applies: text metrics always, rule-based
labels when ``--task`` names an IMHI set, classifier labels and BARTScore when their models are
given. Nothing is written unless every metric succeeded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from phyassist.io import atomic_write_json, read_jsonl


def read_records(path: Path) -> list[dict]:
    """prediction/reference records from .jsonl or a goldens/generated_text .csv."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    if path.suffix == ".csv":
        from phyassist.evaluate.generate import read_outputs_csv

        refs, preds = read_outputs_csv(path)
        return [{"prediction": p, "reference": r} for p, r in zip(preds, refs)]
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", required=True, help="JSONL of prediction/reference records, or CSV")
    parser.add_argument("--output", required=True, help="scores JSON to write")
    parser.add_argument("--task", default=None, help="IMHI set name: adds label metrics")
    parser.add_argument("--lang", default="en", choices=["en", "zh"])
    parser.add_argument("--embedding-model", default=None, help="sentence-transformers model (default MiniLM)")
    parser.add_argument("--bartscore-model", default=None, help="e.g. facebook/bart-large-cnn or a folder")
    parser.add_argument("--bartscore-checkpoint", default=None, help="ParaBank2 bart_score.pth")
    parser.add_argument("--classifier", default=None,
                        help="MentalBERT classifier folder, folder of <SET>/, or Hub owner (needs --task)")


def score_file(args: argparse.Namespace) -> dict:
    from phyassist.evaluate.metrics import score_records

    src = Path(args.input)
    records = read_records(src)
    scores = score_records(records, args.task, args.lang, args.embedding_model, source=str(src))
    preds = [str(r["prediction"]) for r in records]
    refs = [str(r["reference"]) for r in records]
    if args.classifier:
        if not args.task:
            raise ValueError("--classifier needs --task (which set's classes to predict)")
        from phyassist.evaluate.classifier import classify
        from phyassist.evaluate.labels import label_metrics, parse_labels
        from phyassist.evaluate.tiny import resolve_classifier

        pred = classify(preds, args.task, resolve_classifier(args.classifier, args.task))
        scores["labels_classifier"] = label_metrics(parse_labels(refs, args.task), pred, args.task)
    if args.bartscore_model:
        from phyassist.evaluate.bartscore import bart_score

        scores["bartscore"] = bart_score(preds, refs, args.bartscore_model, args.bartscore_checkpoint)
    scores["input"] = str(src)
    return scores


def main(cfg, args: argparse.Namespace) -> int:
    scores = score_file(args)
    atomic_write_json(args.output, scores)
    print(f"[score] {len(scores)} entries -> {args.output}")
    return 0
