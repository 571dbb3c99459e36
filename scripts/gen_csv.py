"""The study's converter, kept: one source file in, the training CSV (one ``text`` column in the
model's chat format) out. Unlike the study's script it never needs editing per data set: it
recognises IMHI instruction/complete files, counsel-chat and any question/answer table by their
columns (or takes ``--source``), cleans with the data stage's rules, prints the per-rule counts,
and writes atomically (a failed run leaves no output file).

    python scripts/gen_csv.py --origin_path ../shared/data/MentalLLaMA/train_data/instruction_data/DR/train.csv \\
        --new_path /tmp/dr.csv
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ["imhi", "imhi_complete", "counsel_chat", "table"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--origin_path", required=True, help="source file (CSV, TSV, JSON or JSONL)")
    p.add_argument("--new_path", required=True, help="output CSV with one `text` column")
    p.add_argument("--source", choices=KINDS, default=None, help="source kind (default: recognised by columns)")
    p.add_argument("--name", default=None, help="source name in the report (default: from the path)")
    p.add_argument("--question-column", default=None, help="table: column holding the question")
    p.add_argument("--answer-column", default=None, help="table: column holding the answer")
    p.add_argument("--model", default="mixtral-8x7b-instruct",
                   help="registry key, Hub id or local path whose chat template and tokenizer are used "
                        "(default: the study's Mixtral-8x7B-Instruct)")
    p.add_argument("--system-prompt", default=None, help="optional system prompt")
    p.add_argument("--n-rows", type=int, default=None, help="seeded sample of this many rows after cleaning")
    p.add_argument("--max-tokens", type=int, default=1024, help="drop formatted rows longer than this")
    p.add_argument("--jsonl", default=None, help="also write prompt/completion records here")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, origin: Path):
    """A one-source run config: the data stage does the work, nothing is written twice."""
    from phyassist.config import validate
    from phyassist.data.sources import recognise
    from phyassist.data.tables import columns_of, read_table

    kind = args.source or recognise(origin, columns_of(read_table(origin)))
    variant = "complete" if kind == "imhi_complete" else "instruction"
    kind = "imhi" if kind == "imhi_complete" else kind
    name = args.name or (origin.parent.name if kind == "imhi" else origin.stem)
    source = {"name": name, "kind": kind, "path": str(origin.resolve()), "n_rows": args.n_rows}
    if kind == "imhi":
        source["variant"] = variant
    if kind == "table":
        source.update(question_column=args.question_column, answer_column=args.answer_column)
    raw = {"name": "gen_csv", "seed": args.seed, "model": {"name": args.model},
           "data": {"sources": [source], "system_prompt": args.system_prompt, "val_fraction": 0,
                    "check_leakage": False,
                    "cleaning": {"max_tokens": args.max_tokens, "drop_test_overlap": False}}}
    return validate(raw, "gen_csv arguments")


def run(args: argparse.Namespace) -> int:
    from phyassist.data.report import print_counts
    from phyassist.data.stage import prepare

    origin, new_path = Path(args.origin_path), Path(args.new_path)
    if not origin.exists():
        raise FileNotFoundError(f"{origin}: file not found (--origin_path)")
    cfg = build_config(args, origin)
    with tempfile.TemporaryDirectory(prefix="gen_csv.") as tmp:
        result = prepare(cfg, out_dir=tmp)
        print_counts(result["report"])
        from phyassist.io import atomic_path

        with atomic_path(new_path) as part:
            shutil.copyfile(Path(tmp) / "train.csv", part)
        if args.jsonl:
            with atomic_path(args.jsonl) as part:
                shutil.copyfile(Path(tmp) / "train.jsonl", part)
    print(f"wrote {result['train']} rows to {new_path}" + (f" and {args.jsonl}" if args.jsonl else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from phyassist.config import ConfigError

    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
