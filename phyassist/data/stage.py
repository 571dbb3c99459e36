"""The data stage: read the configured sources, clean them (every removal counted and
explained), take the seeded mix, format it through the model's chat template, split it, check it
against the test sets, and write ``<out>/data/``:

- ``train.jsonl`` / ``val.jsonl``: records ``source, origin, question, answer, prompt, completion,
  text, n_tokens`` (``answer`` is the gold; ``text == prompt + completion``)
- ``train.csv`` / ``val.csv``: the study's single ``text`` column
- ``cleaning_report.json`` / ``.md``, ``removed.jsonl`` (every removed row and why),
  ``token_lengths.png``
- ``records.json``: the model and chat template the records were formatted for; train, evaluate
  and the app refuse records made for another template (:func:`phyassist.data.records.check_run_records`)

``python -m phyassist data --config smoke [--figure images/token_lengths.png]``
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from collections import defaultdict
from pathlib import Path

from phyassist.data import clean, dedup
from phyassist.data.records import MANIFEST, DataError, Row, records_manifest
from phyassist.data.report import Ledger, print_counts, to_markdown
from phyassist.data.schema import CleaningConfig, DataConfig, SourceConfig
from phyassist.data.sources import (MENTALLLAMA, group_of, imhi_set, load_rows, locate, map_rows, resolve_dir,
                                    test_dir)
from phyassist.data.split import leakage, split_train_val, take, test_keys
from phyassist.data.tables import read_table
from phyassist.io import atomic_write_json, atomic_write_jsonl, atomic_write_text


def clean_source(rows: list[Row], src: SourceConfig, ccfg: CleaningConfig, ledger: Ledger) -> list[Row]:
    """Row-level rules, in order: held-out split, control characters, mojibake, whitespace,
    empty, links, length in characters."""
    name = src.name
    rows = ledger.record("held_out_split", clean.drop_held_out_split(rows, src.split))
    rows = ledger.record("control_chars", clean.fix_controls(rows), name)
    repaired, unfixable = clean.fix_mojibake(rows, ccfg.fix_mojibake)
    ledger.record("mojibake", repaired, name)
    rows = ledger.record("mojibake_unfixable", unfixable)
    rows = ledger.record("whitespace", clean.fix_whitespace(rows), name)
    rows = ledger.record("empty", clean.drop_empty(rows))
    if ccfg.drop_links:
        rows = ledger.record("links", clean.drop_links(rows))
    if ccfg.max_chars:
        rows = ledger.record("too_long_chars", clean.drop_too_long_chars(rows, ccfg.max_chars))
    return rows


def clean_pool(rows: list[Row], ccfg: CleaningConfig, ledger: Ledger, keys: set[str], seed: int) -> list[Row]:
    """Rules across all sources: exact and near duplicates (first kept), test-set overlap."""
    if ccfg.dedup_exact:
        rows = ledger.record("exact_duplicate", dedup.drop_exact_duplicates(rows))
    if ccfg.near_dup_threshold:
        rows = ledger.record("near_duplicate", dedup.drop_near_duplicates(rows, ccfg.near_dup_threshold, seed))
    if ccfg.drop_test_overlap and keys:
        rows = ledger.record("test_overlap", clean.drop_test_overlap(rows, keys))
    return rows


def load_test_sets(dcfg: DataConfig) -> dict[str, list[Row]]:
    """Every IMHI test set present (instruction and complete variants), by file stem."""
    out: dict[str, list[Row]] = {}
    inst = test_dir(dcfg)
    for folder, variant in ((inst, "instruction"), (inst.parent / "test_complete", "complete")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.csv")):
            name = path.stem if variant == "instruction" else f"{path.stem}_complete"
            src = SourceConfig(name=name, kind="imhi", variant=variant, split="test")
            out[name] = repair_text(map_rows(path, read_table(path), src))
    return out


def repair_text(rows: list[Row]) -> list[Row]:
    """The text repairs alone (no drops), so test items compare with cleaned training rows."""
    rows = clean.fix_controls(rows).kept
    return clean.fix_whitespace(clean.fix_mojibake(rows)[0].kept).kept


def _kinds(dcfg: DataConfig) -> dict[str, str]:
    return {s.name: s.kind for s in dcfg.sources}


def _accept(tokenizer, dcfg: DataConfig, kinds: dict[str, str]):
    from phyassist.data.format import count_tokens, format_rows

    def accept(batch: list[Row]):
        recs = format_rows(tokenizer, batch, dcfg.system_prompt, kinds, dcfg.note_sections)
        for rec, n in zip(recs, count_tokens(tokenizer, [r["text"] for r in recs])):
            rec["n_tokens"] = n
        if not dcfg.cleaning.max_tokens:
            return recs, []
        lengths = {r["origin"]: r["n_tokens"] for r in recs}
        outcome = clean.drop_too_long_tokens(batch, lengths, dcfg.cleaning.max_tokens)
        ok = {r.origin for r in outcome.kept}
        return [r for r in recs if r["origin"] in ok], outcome.removed

    return accept


def study_csv(records: list[dict]) -> str:
    """The study's training CSV: one ``text`` column."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text"])
    w.writerows([r["text"]] for r in records)
    return buf.getvalue()


def prepare(cfg, tokenizer=None, out_dir: str | Path | None = None) -> dict:
    """Run the data stage for ``cfg``; returns the report and the output paths."""
    from phyassist.data.download import make_fetcher
    from phyassist.data.format import formatting_tokenizer, plot_token_lengths, token_stats

    dcfg: DataConfig = cfg.data
    if not dcfg.sources:
        raise DataError("data.sources is empty: list at least one source (see configs/smoke.yaml)")
    for i, s in enumerate(dcfg.sources):
        if s.split == "test":
            raise DataError(f"data.sources[{i}] ({s.name}): split 'test' cannot be trained on; test sets "
                            "are read by the evaluate stage")
    out = Path(out_dir) if out_dir else cfg.out / "data"
    root = resolve_dir(dcfg.data_dir)
    fetch = make_fetcher(dcfg, root) if dcfg.download else None
    ledger = Ledger(dcfg.cleaning.examples_per_rule)

    cleaned: dict[str, list[Row]] = {}
    for src in dcfg.sources:
        loc = locate(src, dcfg, fetch)
        if loc.note:
            ledger.note(loc.note)
        rows = load_rows(src, loc)
        kind = src.kind if src.kind != "imhi" else f"imhi ({imhi_set(src)[1]})"
        ledger.sources[src.name] = {"file": str(loc.path), "split": loc.split, "kind": kind, "raw": len(rows),
                                    "requested": src.n_rows}
        cleaned[src.name] = clean_source(rows, src, dcfg.cleaning, ledger)
        print(f"[data] {src.name}: {len(rows)} rows read from {loc.path}, {len(cleaned[src.name])} "
              "after row rules", flush=True)

    tests = load_test_sets(dcfg) if (dcfg.check_leakage or dcfg.cleaning.drop_test_overlap) else {}
    held_out = [rm.row for rm in ledger.all_removed if rm.rule == "held_out_split"]
    for name in {r.source for r in held_out}:
        tests[f"{name} (held-out test split)"] = [r for r in held_out if r.source == name]
    if not tests and (dcfg.check_leakage or dcfg.cleaning.drop_test_overlap):
        ledger.note(f"no test sets found under {test_dir(dcfg)}: leakage not checked")
    pool = [r for rows in cleaned.values() for r in rows]
    pool = clean_pool(pool, dcfg.cleaning, ledger, test_keys([r for t in tests.values() for r in t]), cfg.seed)

    tokenizer = tokenizer if tokenizer is not None else formatting_tokenizer(cfg.model)
    accept = _accept(tokenizer, dcfg, _kinds(dcfg))
    by_source: dict[str, list[Row]] = defaultdict(list)
    for r in pool:
        by_source[r.source].append(r)
    records: list[dict] = []
    groups: dict[str, str] = {}
    for src in dcfg.sources:
        rows = by_source[src.name]
        groups.update({r.origin: group_of(r) for r in rows})
        recs, too_long = take(rows, src.n_rows, cfg.seed, src.name, accept)
        ledger.removals(too_long)
        info = ledger.sources[src.name]
        info["kept"], info["sampled"] = len(rows) - len(too_long), len(recs)
        if src.n_rows and len(recs) < src.n_rows:
            ledger.note(f"{src.name}: asked for {src.n_rows} rows, only {len(recs)} left after cleaning")
        records.extend(recs)

    if not records:
        raise DataError("no rows left after cleaning; see the cleaning report counts above")
    train, val = split_train_val(records, groups, dcfg.val_fraction, cfg.seed)
    report = ledger.to_dict()
    report["splits"] = {"seed": cfg.seed, "val_fraction": dcfg.val_fraction, "train": len(train), "val": len(val),
                        "by_source": {s.name: {"train": sum(r["source"] == s.name for r in train),
                                               "val": sum(r["source"] == s.name for r in val)}
                                      for s in dcfg.sources}}
    if dcfg.check_leakage:
        report["leakage"] = {"test_dir": str(test_dir(dcfg)), "train_vs_test": leakage(train, tests),
                             "train_vs_val": leakage(train, {"val": [Row(r["source"], r["question"], r["answer"],
                                                                         r["origin"]) for r in val]})["val"]}
    lengths: dict[str, list[int]] = defaultdict(list)
    for r in records:
        lengths[r["source"]].append(r["n_tokens"])
    report["token_stats"] = {"tokenizer": getattr(tokenizer, "name_or_path", ""), "model": cfg.model.name,
                             **token_stats(dict(lengths))}

    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes last and the old one first: records a killed run left half-rewritten carry
    # none, and train refuses them rather than trust another model's manifest.
    (out / MANIFEST).unlink(missing_ok=True)
    files = {
        "train_jsonl": atomic_write_jsonl(out / "train.jsonl", train),
        "val_jsonl": atomic_write_jsonl(out / "val.jsonl", val),
        "train_csv": atomic_write_text(out / "train.csv", study_csv(train)),
        "val_csv": atomic_write_text(out / "val.csv", study_csv(val)),
        "removed": atomic_write_jsonl(out / "removed.jsonl", [
            {"source": rm.row.source, "origin": rm.row.origin, "rule": rm.rule, "detail": rm.detail,
             "question": rm.row.question, "answer": rm.row.answer} for rm in ledger.all_removed]),
        "histogram": plot_token_lengths(dict(lengths), out / "token_lengths.png",
                                        f"{cfg.name}: formatted length, {cfg.model.name} tokenizer",
                                        dcfg.cleaning.max_tokens),
        "report_json": atomic_write_json(out / "cleaning_report.json", report),
        "report_md": atomic_write_text(out / "cleaning_report.md", to_markdown(report)),
    }
    files["manifest"] = atomic_write_json(out / MANIFEST, records_manifest(cfg.model.name, tokenizer,
                                                                           dcfg.system_prompt))
    return {"out_dir": out, "report": report, "files": {k: str(v) for k, v in files.items()},
            "train": len(train), "val": len(val)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--figure", default=None,
                        help="also copy the token-length histogram here (e.g. images/token_lengths.png)")


def main(cfg, args: argparse.Namespace) -> int:
    from phyassist.runinfo import write_run_info

    result = prepare(cfg)
    write_run_info(cfg)
    print_counts(result["report"])
    print(f"[data] train {result['train']} / val {result['val']} records -> {result['out_dir']}")
    figure = getattr(args, "figure", None)
    if figure:
        Path(figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["files"]["histogram"], figure)
        print(f"[data] histogram copied to {figure}")
    return 0


__all__ = ["prepare", "main", "clean_source", "clean_pool", "load_test_sets", "MENTALLLAMA"]
