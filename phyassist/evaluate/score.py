"""``python -m phyassist score --input preds.jsonl --output scores.json [--task DR] [--lang zh]``
``python -m phyassist score --config real-eval -o runs/rescore evaluate.test_dir=<IMHI test_instruction folder>
--answers answers_base.jsonl.gz answers_finetuned.jsonl.gz``

The second form rescores committed answer files (:mod:`phyassist.evaluate.answers`) against your
own copy of the test sets and writes the evaluate stage's table, plots and results under
``<out>/eval/``.

Scores a file of ``prediction``/``reference`` records (JSON lines), or a MentalLLaMA output CSV
(``goldens, generated_text``), with every metric that applies: text metrics always, rule-based
labels in both modes (official, robust) with bootstrap intervals when ``--task`` names an IMHI set, classifier labels and BARTScore when their models are
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
    parser.add_argument("--input", "-i", default=None, help="JSONL of prediction/reference records, or CSV")
    parser.add_argument("--output", default=None, help="scores JSON to write (with --input)")
    parser.add_argument("--answers", nargs="+", default=None, metavar="answers_<system>.jsonl.gz",
                        help="rescore answer files against the config's test sets (needs --config)")
    parser.add_argument("--task", default=None,
                        help="IMHI set name: adds label metrics in official and robust mode, with 95%% intervals")
    parser.add_argument("--lang", default="auto", choices=["auto", "en", "zh"],
                        help="text-metric language (auto: detected; a mixed file is an error)")
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
        from phyassist.evaluate.labels import UNLABELLED, label_metrics, parse_gold
        from phyassist.evaluate.tiny import resolve_classifier

        gold = parse_gold(refs, args.task)
        keep = [i for i, g in enumerate(gold) if g != UNLABELLED]
        pred = classify([preds[i] for i in keep], args.task, resolve_classifier(args.classifier, args.task))
        scores["labels_classifier"] = label_metrics([gold[i] for i in keep], pred, args.task)
    if args.bartscore_model:
        from phyassist.evaluate.bartscore import bart_score, variant_name

        scores["bartscore"] = bart_score(preds, refs, args.bartscore_model, args.bartscore_checkpoint)
        scores["bartscore_variant"] = variant_name(args.bartscore_model, args.bartscore_checkpoint)
    scores["input"] = str(src)
    for key in [k for k in scores if k.startswith("labels_")]:
        scores[key].pop("labels", None)
    return scores


def main(cfg, args: argparse.Namespace) -> int:
    if args.answers:
        if cfg is None:
            raise ValueError("--answers needs --config (which test sets and label settings), "
                             "e.g. --config real-eval evaluate.test_dir=<folder>")
        if args.input:
            raise ValueError("give either --input or --answers, not both")
        stray = [a for a in args.answers if "=" in a]
        if stray:
            raise ValueError(f"--answers takes files; put key=value overrides such as {stray[0]!r} before --answers")
        from phyassist.evaluate.answers import rescore

        res = rescore(cfg, [Path(a) for a in args.answers])
        print(Path(res["table_md"]).read_text(encoding="utf-8"))
        print(f"[score] table: {res['table_csv']}  results: {Path(res['table_csv']).parent / 'results.json'}")
        return 0
    if not args.input or not args.output:
        raise ValueError("give --input and --output (a records file), or --answers with --config")
    scores = score_file(args)
    atomic_write_json(args.output, scores)
    print(f"[score] {len(scores)} entries -> {args.output}")
    return 0
