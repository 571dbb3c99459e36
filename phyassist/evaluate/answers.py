"""Generated answers as a small file anyone can rescore, without the third-party queries or gold.

``answers_<system>.jsonl.gz``: one JSON line per answer, ``{"set", "i", "key", "answer"}``: the set
name, the row of the test file (0-based), a hash of the query (:func:`~phyassist.evaluate.generate.
query_key`: it proves the answer belongs to that query of that file version, and reveals nothing of
it) and the generated text. :func:`rescore` rebuilds MentalLLaMA-layout output files from these
and the user's own copy of the test sets, then scores them like the evaluate stage.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Sequence

from phyassist.io import atomic_path

PREFIX = "answers_"
SUFFIX = ".jsonl.gz"


def answers_path(folder: Path, system: str) -> Path:
    return Path(folder) / f"{PREFIX}{system}{SUFFIX}"


def system_of(path: Path) -> str:
    name = Path(path).name
    if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
        raise ValueError(f"{path}: expected a file named {PREFIX}<system>{SUFFIX}")
    return name[len(PREFIX):-len(SUFFIX)]


def export_answers(eval_folder: Path, sets, systems: Sequence[str], dest: Path) -> list[Path]:
    """Write ``answers_<system>.jsonl.gz`` under ``dest`` from ``<eval_folder>/<system>/<SET>.csv``
    (complete sets only; gzip with a fixed mtime, so the same answers give the same bytes)."""
    from phyassist.evaluate.generate import query_key, read_outputs_csv

    out = []
    for system in systems:
        lines = []
        for ts in sets:
            csv = Path(eval_folder) / system / f"{ts.name}.csv"
            if not csv.exists():
                continue
            goldens, generated = read_outputs_csv(csv)
            if goldens != [str(g) for g in ts.goldens]:
                raise ValueError(f"{csv}: its gold answers are not those of {ts.path}")
            lines += [json.dumps({"set": ts.name, "i": i, "key": query_key(q), "answer": a}, ensure_ascii=False)
                      for i, (q, a) in enumerate(zip(ts.queries, generated))]
        if not lines:
            continue
        path = answers_path(dest, system)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(("\n".join(lines) + "\n").encode("utf-8"))
        out.append(path)
    return out


def read_answers(path: Path) -> dict[str, dict[int, dict]]:
    """{set: {row: record}}; a torn or malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: answers file not found")
    out: dict[str, dict[int, dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                s, i = str(rec["set"]), int(rec["i"])
                rec["key"], rec["answer"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {n} is not an answer record ({e})") from None
            out.setdefault(s, {})[i] = rec
    if not out:
        raise ValueError(f"{path}: no answers")
    return out


def answers_for(ts, records: dict[int, dict], source: Path) -> list[str]:
    """The answers of one test set in row order; a missing row or a query that changed is an error."""
    from phyassist.evaluate.generate import query_key

    missing = [i for i in range(len(ts.queries)) if i not in records]
    if missing:
        raise ValueError(f"{source}: set {ts.name}: no answer for row(s) {missing[:5]} "
                         f"({len(missing)} of {len(ts.queries)} missing)")
    changed = [i for i, q in enumerate(ts.queries) if records[i]["key"] != query_key(q)]
    if changed:
        raise ValueError(f"{source}: set {ts.name}: row(s) {changed[:5]} answer another query than "
                         f"{ts.path} holds (a different version of the test file?)")
    return [str(records[i]["answer"]) for i in range(len(ts.queries))]


def rescore(cfg, answer_files: Sequence[Path], title: str | None = None) -> dict:
    """Score answer files against the configured test sets; writes ``<out>/eval/`` like the
    evaluate stage (both label modes, intervals, paired tests, majority baseline, confusion)."""
    from phyassist.evaluate.generate import write_outputs_csv
    from phyassist.evaluate.stage import eval_dir, score_and_tabulate
    from phyassist.evaluate.testsets import load_test_sets

    sets = load_test_sets(cfg)
    systems = []
    for f in answer_files:
        system = system_of(f)
        recs = read_answers(f)
        unknown = sorted(set(recs) - {ts.name for ts in sets})
        if unknown:
            raise ValueError(f"{f}: answers for set(s) {unknown} that evaluate.sets does not name")
        for ts in sets:
            if ts.name not in recs:
                raise ValueError(f"{f}: no answers for set {ts.name}")
            write_outputs_csv(eval_dir(cfg) / system / f"{ts.name}.csv", ts.goldens, answers_for(ts, recs[ts.name], f))
        systems.append(system)
    return score_and_tabulate(cfg, sets, systems, title)
