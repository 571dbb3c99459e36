"""The README's results tables and the training bench documents agree with the committed raw files.

Every figure of the README's results tables must come from a raw file in bench/; each table names the raw files
its figures come from (``RESULTS_TABLES``). The Mixtral fine-tuning table is rebuilt exactly from the raw JSONs
with the bench scripts' own ``--from-json`` functions (true medians of the per-step times); the other tables are
checked number by number against their raw files, with the rounding the README shows (41.4 matches 41.38), and
a ratio written ``(R×)`` against the same column's first row. CPU only, no model is built.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# README results table (the bold heading above it) -> raw files behind its figures.
RESULTS_TABLES = {
    "Fine-tuning Mixtral-8x7B in 4-bit QLoRA": ["finetune_mixtral.json", "finetune_mixtral_keepw.json",
                                                 "finetune_mixtral_keepw_repeat.json", "trainer_gpu_repeat.json",
                                                 "trainer_gpu.json", "trainer_gpu_keepw.json"],
    "Generation": ["generation_mixtral/run.json"],
    "App": ["app.json", "app_gpu.json"],
    "Evaluation on IMHI": ["real_eval/scores/results.json", "real_eval/scores/comparison.csv",
                           "real_eval/data_mix.json"],
    "Recipes": ["recipe_covid_gpu/intervals.json"],
}
# the JSON keys a table's figures are read from (so that a figure cannot match an unrelated value of the file)
RESULT_KEYS = {
    "Generation": {"tokens_per_s", "first_token_s", "decode_tok_s", "decode_tok_s_events"},
    "App": {"median_warm_s", "p95_ms", "wall_s", "seconds"},
}
# a figure: an optional minus sign (not a hyphen inside a word), digits with thousands commas, decimals, a ratio sign
NUMBER = re.compile(r"(?<![\w.])(?:([-−])(?=\d))?(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?\s*(×|x\b)?")


def results_tables() -> dict[str, list[list[str]]]:
    """The README's results section: {bold heading: data rows (cells)} of every table in it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in section.splitlines():
        if line.startswith("**"):
            heading = line[2:].split("**", 1)[0].strip()
        elif line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = tables.setdefault(heading, [])
            rows.append(cells)  # the first row is the header
    return tables


def raw_numbers(names, keys=None) -> list[float]:
    """The numbers in the raw files (JSON values, numbers written in text files); with ``keys``, only the JSON
    values stored under those keys."""
    out: list[float] = []

    def walk(o, key=None):
        if isinstance(o, bool):
            return
        if isinstance(o, (int, float)):
            if keys is None or key in keys:
                out.append(float(o))
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, k)
        elif isinstance(o, list):
            for v in o:
                walk(v, key)
        elif isinstance(o, str) and keys is None:
            out.extend(float(m.replace(",", "")) for m in re.findall(r"\d+(?:,\d{3})*(?:\.\d+)?", o))

    for name in names:
        path = BENCH / name
        if path.suffix == ".json":
            walk(json.loads(path.read_text()))
        else:
            walk(path.read_text())
    return out


def matches(figure: float, digits: int, values) -> bool:
    tol = 0.5 * 10 ** -digits + 1e-9
    return any(abs(v - figure) <= tol or abs(100 * v - figure) <= tol or abs(1000 * v - figure) <= tol
               for v in values)


def cell_numbers(cell: str) -> list[tuple[float, int, bool]]:
    """(value, decimals, is a ratio) of each figure in a cell, leaving out targets and code spans."""
    cell = re.sub(r"\([^)]*target[^)]*\)", "", cell)
    cell = re.sub(r"`[^`]*`", "", cell)
    cell = re.sub(r"<\s*\d[\d.]*", "", cell)  # a bound ("p < 0.001"), not a measured figure
    return [((-1 if m.group(1) else 1) * float((m.group(2) + "." + (m.group(3) or "0")).replace(",", "")),
             len(m.group(3) or ""), bool(m.group(4)))
            for m in NUMBER.finditer(cell)]


def test_every_results_table_names_its_raw_files():
    tables = results_tables()
    assert "Fine-tuning Mixtral-8x7B in 4-bit QLoRA" in tables and "Generation" in tables and "App" in tables
    for heading in tables:
        assert heading in RESULTS_TABLES, f"README results table under **{heading}**: add its raw files to RESULTS_TABLES"
    for heading, names in RESULTS_TABLES.items():
        for name in names or []:
            assert (BENCH / name).is_file(), f"{heading}: raw file bench/{name} is not committed"


@pytest.mark.parametrize("heading", [h for h, names in RESULTS_TABLES.items()
                                     if names and not h.startswith("Fine-tuning")])
def test_readme_table_figures_come_from_raw_files(heading):
    rows = results_tables()[heading][1:]
    values = raw_numbers(RESULTS_TABLES[heading], RESULT_KEYS.get(heading))
    assert values, heading
    first = rows[0]
    checked = 0
    for row in rows:
        for col, cell in enumerate(row[1:], start=1):
            for value, digits, ratio in cell_numbers(cell):
                if ratio:  # "41.4 (6.1×)": this row's figure over the first row's, same column
                    base = cell_numbers(first[col])[0][0]
                    own = cell_numbers(cell)[0][0]
                    assert abs(own / base - value) <= 0.5 * 10 ** -digits + 1e-9, f"{heading}: {cell!r}"
                else:
                    assert matches(value, digits, values), (
                        f"README **{heading}**: {value} in {cell!r} is in none of {RESULTS_TABLES[heading]}")
                checked += 1
    assert checked >= 5


def _span(values, digits=2, sep="–") -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}{sep}{hi}"


def test_readme_finetuning_table_is_rebuilt_from_the_raw_json():
    """Peak GiB and pooled MFU of the bare step, each run's median optimizer step and the ratio to plain through
    the trainer: recomputed with the bench scripts' --from-json functions, equal to the README's cells."""
    from bench import finetune_mixtral as fm
    from bench import trainer_gpu as tg

    groups = fm.pooled([fm.recompute(BENCH / "finetune_mixtral.json")])
    step = {g["variant"]: g for g in groups if g["part"] == "full"}
    kept = {g["variant"]: g for g in fm.pooled([fm.recompute(BENCH / n) for n in
                                                ("finetune_mixtral_keepw.json", "finetune_mixtral_keepw_repeat.json")])}
    runs = [tg.recompute(BENCH / n) for n in ("trainer_gpu_repeat.json", "trainer_gpu.json")]
    keep_run = tg.recompute(BENCH / "trainer_gpu_keepw.json")

    def trainer(recipe, rs):
        rows = [r for run in rs for r in run["rows"] if r["recipe"] == recipe]
        return rows, rows[0]["peak_gib"]

    plain, plain_peak = trainer("plain", runs)
    paper, paper_peak = trainer("flat-grouped", runs)
    fast, fast_peak = trainer("fast", [keep_run])
    ratios = [r["vs_plain"] for r in paper]

    def cell(g):
        return f"{g['peak_gib']:.2f} · {100 * g['mfu']:.1f} %"

    expected = {
        "plain": (cell(step["plain"]), f"{_span([r['median_s'] for r in plain])} · {plain_peak:.2f}"),
        "paper": (cell(step["fused-cattn-bf16lora+flat"]),
                  f"{_span([r['median_s'] for r in paper])} ({_span(ratios)}×) · {paper_peak:.2f}"),
        "single-gpu": (cell(kept["fused-cnockpt-bf16lora+flat+perexpert+keepw8"]),
                       f"{_span([r['median_s'] for r in fast])} · {fast_peak:.2f}"),
    }
    rows = results_tables()["Fine-tuning Mixtral-8x7B in 4-bit QLoRA"][1:]
    found = {}
    for row in rows:
        key = "paper" if "paper.yaml" in row[0] else "single-gpu" if "single-gpu.yaml" in row[0] else "plain"
        found[key] = tuple(row[1:3])
        if key == "paper":
            halves = [g["peak_gib"] for g in groups if g["part"] != "full"]
            assert f"{max(halves):.2f} GiB per half" in row[0]
    assert found == expected


def test_bench_reports_use_true_medians():
    """The tables the documents quote are true medians of the stored step times, and the JSONs' recorded
    step_s (written before the scripts took statistics.median) is the upper median of an even count."""
    from bench import finetune_mixtral as fm
    from bench import trainer_gpu as tg

    run = fm.recompute(BENCH / "finetune_mixtral.json")
    plain = run["rows"][0]
    assert plain["median_s"] == statistics.median(plain["times"])
    assert plain["recorded_s"] == sorted(plain["times"])[len(plain["times"]) // 2]
    assert "| plain | full | 28.29 | 8 | 0.9967 | 1.0007 |" in fm.report([BENCH / "finetune_mixtral.json"])
    text = tg.report([BENCH / "trainer_gpu_keepw.json"])
    assert "| fast | 72.60 | 4 | 2.0185 | 2.021 |" in text and "pooled" in text


@pytest.mark.parametrize("doc", ["finetune_mixtral.md", "trainer_gpu.md", "test_suite.md", "study_2gpu.md"])
def test_bench_documents_name_committed_raw_files(doc):
    """Raw files a bench document names in code spans exist in bench/ (files of older runs are named with the
    commit that holds them, `git show <commit>:<path>`, and are not checked here)."""
    text = (BENCH / doc).read_text()
    names = set(re.findall(r"`([\w.+\-/]+\.(?:json|txt|csv))`", text))
    assert names, doc
    for name in names:
        if ":" in name or name.startswith("$"):
            continue
        path = BENCH / name if not name.startswith("bench/") else ROOT / name
        assert path.is_file(), f"bench/{doc} names {name}, which is not committed"
