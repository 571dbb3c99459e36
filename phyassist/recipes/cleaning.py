"""The kit's cleaning rules (:mod:`phyassist.data.clean`, :mod:`phyassist.data.dedup`) applied to
chat records, with the same per-rule report the data stage writes.

Text repairs run on every message. Drops look at a sample as the rules' ``Row``: the last message
is the answer, everything before it the question, so an exact duplicate means the same history
and the same answer. Near-duplicate removal runs for whole conversations only: consecutive
doctor-turn samples of one dialogue share most of their history by construction.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from phyassist.io import atomic_write_json, atomic_write_text

MAX_EXAMPLES = 3


def repair_text(text: str, fix_mojibake: bool) -> str:
    from phyassist.data.clean import normalise_whitespace, repair_mojibake, strip_controls

    text = normalise_whitespace(strip_controls(text))
    return repair_mojibake(text) if fix_mojibake else text


def repair_record(rec: dict, fix_mojibake: bool) -> tuple[dict, bool]:
    """(record with repaired messages, whether anything changed)."""
    msgs = [{**m, "content": repair_text(m["content"], fix_mojibake)} for m in rec["messages"]]
    return {**rec, "messages": msgs}, msgs != rec["messages"]


def as_row(rec: dict, split: str):
    from phyassist.data.records import Row

    body = [m["content"] for m in rec["messages"] if m["role"] != "system"]
    return Row(source=rec.get("source", split), question="\n".join(body[:-1]), answer=body[-1],
               origin=f"{split}:{rec['id']}", group=f"{split}:{str(rec['id']).split('-')[0]}")


def drop_rules(rows: list, ccfg, unit: str) -> list:
    """The configured drop rules in the data stage's order; returns the rules' Outcomes."""
    from phyassist.data import clean, dedup

    outcomes = []

    def run(rule):
        nonlocal rows
        out = rule(rows)
        outcomes.append(out)
        rows = out.kept

    run(clean.drop_empty)
    if ccfg.drop_links:
        run(clean.drop_links)
    if ccfg.max_chars:
        run(lambda r: clean.drop_too_long_chars(r, ccfg.max_chars))
    if ccfg.dedup_exact:
        run(dedup.drop_exact_duplicates)
    if ccfg.near_dup_threshold and unit == "conversation":
        run(lambda r: dedup.drop_near_duplicates(r, ccfg.near_dup_threshold))
    return outcomes


def clean_split(records: list[dict], split: str, ccfg, unit: str) -> tuple[list[dict], dict]:
    repaired, fixed = [], 0
    for rec in records:
        rec, changed = repair_record(rec, ccfg.fix_mojibake)
        repaired.append(rec)
        fixed += changed
    rows = [as_row(r, split) for r in repaired]
    outcomes = drop_rules(rows, ccfg, unit)
    removed = [x for o in outcomes for x in o.removed]
    gone = {x.row.origin for x in removed}
    kept = [r for r, row in zip(repaired, rows) if row.origin not in gone]
    by_rule = Counter(x.rule for x in removed)
    examples = {rule: [{"origin": x.row.origin, "detail": x.detail} for x in removed if x.rule == rule][:MAX_EXAMPLES]
                for rule in by_rule}
    return kept, {"input": len(records), "repaired": fixed, "removed": dict(by_rule), "kept": len(kept),
                  "examples": examples}


def report_markdown(report: dict) -> str:
    from phyassist.data.clean import DESCRIPTIONS

    lines = ["# Cleaning report (recipe data)", "", "| split | input | repaired | removed | kept |",
             "| --- | --- | --- | --- | --- |"]
    for split, r in report.items():
        removed = ", ".join(f"{k}: {v}" for k, v in r["removed"].items()) or "0"
        lines.append(f"| {split} | {r['input']} | {r['repaired']} | {removed} | {r['kept']} |")
    rules = sorted({k for r in report.values() for k in r["removed"]})
    if rules:
        lines += ["", "| rule | meaning | examples |", "| --- | --- | --- |"]
        for rule in rules:
            ex = "; ".join(f"{e['origin']} ({e['detail']})" for r in report.values()
                           for e in r["examples"].get(rule, []))[:300]
            lines.append(f"| {rule} | {DESCRIPTIONS.get(rule, '')} | {ex} |")
    return "\n".join(lines) + "\n"


def clean_dialogue_splits(cfg, splits: dict[str, list[dict]], out_dir: Path) -> tuple[dict, dict]:
    """Clean every split; write ``cleaning_report.json/.md`` into ``out_dir``."""
    ccfg, unit = cfg.data.cleaning, cfg.recipe.data.unit
    cleaned, report = {}, {}
    for split, records in splits.items():
        cleaned[split], report[split] = clean_split(records, split, ccfg, unit)
    atomic_write_json(out_dir / "cleaning_report.json", report)
    atomic_write_text(out_dir / "cleaning_report.md", report_markdown(report))
    return cleaned, report
