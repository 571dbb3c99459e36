"""The cleaning report: per source and rule, how many rows were removed or repaired, with
examples. Printed, saved as JSON and Markdown, and shown as a table in notebook 01."""

from __future__ import annotations

from collections import Counter, defaultdict

from phyassist.data.clean import DESCRIPTIONS, Outcome
from phyassist.data.records import Removed, snippet

REPAIRS = ("control_chars", "mojibake", "whitespace")


class Ledger:
    """Accumulates what every rule did, per source."""

    def __init__(self, examples_per_rule: int = 3):
        self.k = examples_per_rule
        self.sources: dict[str, dict] = {}
        self.removed: dict[str, Counter] = defaultdict(Counter)  # rule -> source -> n
        self.fixed: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.all_removed: list[Removed] = []
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        print(f"[data] {text}", flush=True)
        self.notes.append(text)

    def record(self, rule: str, outcome: Outcome, source: str | None = None) -> list:
        """Count ``outcome`` under ``rule``; return the rows kept."""
        if outcome.fixed and source is not None:
            self.fixed[rule][source] += outcome.fixed
        self.removals(outcome.removed)
        return outcome.kept

    def removals(self, removed: list[Removed]) -> None:
        for rm in removed:
            self.removed[rm.rule][rm.row.source] += 1
            ex = self.examples[rm.rule][rm.row.source]
            if len(ex) < self.k:
                ex.append({"origin": rm.row.origin, "detail": rm.detail,
                           "question": snippet(rm.row.question), "answer": snippet(rm.row.answer)})
        self.all_removed.extend(removed)

    def to_dict(self) -> dict:
        rules = [r for r in DESCRIPTIONS if r in self.removed or r in self.fixed]
        return {
            "sources": self.sources,
            "rules": {r: DESCRIPTIONS[r] for r in rules},
            "removed": {r: dict(self.removed[r]) for r in rules if r in self.removed},
            "repaired": {r: dict(self.fixed[r]) for r in rules if r in self.fixed},
            "removed_total": {r: sum(self.removed[r].values()) for r in rules if r in self.removed},
            "examples": {r: dict(v) for r, v in self.examples.items()},
            "notes": self.notes,
        }


def table_rows(report: dict) -> list[dict]:
    """One row per rule (removed, then repaired), one column per source, plus the totals."""
    names = list(report["sources"])
    rows = [{"rule": "rows read", **{n: report["sources"][n]["raw"] for n in names}}]
    for kind, key in (("removed", "removed"), ("repaired", "repaired")):
        for rule, counts in report[key].items():
            rows.append({"rule": f"{kind}: {rule}", **{n: counts.get(n, 0) for n in names}})
    for label, field in (("kept after cleaning", "kept"), ("in the mix", "sampled")):
        rows.append({"rule": label, **{n: report["sources"][n].get(field, 0) for n in names}})
    for r in rows:
        r["total"] = sum(r[n] for n in names)
    return rows


def report_frame(report: dict):
    """The table as a pandas DataFrame (for the notebook)."""
    import pandas as pd

    return pd.DataFrame(table_rows(report)).set_index("rule")


def to_markdown(report: dict) -> str:
    names = list(report["sources"])
    head = ["rule", *names, "total"]
    lines = ["# Cleaning report", "",
             "Rows removed or repaired per source and rule (`removed:` rows are gone, with the reason "
             "below; `repaired:` rows were kept with their text fixed).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(report):
        lines.append("| " + " | ".join(str(r[h]) for h in head) + " |")
    lines += ["", "## Sources", ""]
    for n, s in report["sources"].items():
        lines.append(f"- **{n}**: `{s['file']}` (split {s['split']}; {s['raw']} rows read, "
                     f"{s.get('sampled', 0)} in the mix of {s.get('requested') or 'all'} requested)")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {t}" for t in report["notes"]]
    lines += ["", "## Rules", ""] + [f"- `{r}`: {d}" for r, d in report["rules"].items()]
    lines += ["", "## Examples of removed rows", ""]
    for rule, per_source in report["examples"].items():
        for source, exs in per_source.items():
            for e in exs:
                lines.append(f"- `{rule}` {source} `{e['origin']}`: {e['detail']} — "
                             f"Q: {e['question'][:100]!r} A: {e['answer'][:60]!r}")
    for key, title in (("splits", "Splits"), ("leakage", "Leakage check (train vs test sets)")):
        if key in report:
            lines += ["", f"## {title}", "", "```", _fmt(report[key]), "```"]
    return "\n".join(lines) + "\n"


def _fmt(obj) -> str:
    import json

    return json.dumps(obj, indent=1, ensure_ascii=False)


def print_counts(report: dict) -> None:
    """The per-rule table on stdout."""
    rows = table_rows(report)
    names = ["rule", *report["sources"], "total"]
    width = {n: max(len(n), *(len(str(r[n])) for r in rows)) for n in names}
    print("  ".join(n.ljust(width[n]) for n in names))
    for r in rows:
        print("  ".join(str(r[n]).ljust(width[n]) for n in names))
