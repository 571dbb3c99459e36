"""Evaluation sets: IMHI's ``<SET>.csv`` files (columns ``query`` and ``gpt-3.5-turbo``, the gold),
or any CSV / JSON-lines file named in YAML with its own columns and classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phyassist.paths import REPO_ROOT, SAMPLE_DIR

QUERY, GOLD = "query", "gpt-3.5-turbo"
IMHI_TEST_SUBDIR = Path("MentalLLaMA") / "test_data" / "test_instruction"


@dataclass
class TestSet:
    name: str
    path: Path
    queries: list[str]
    goldens: list[str]
    task: Any = None          # labels.Task, or None: text metrics only
    classifier: str | None = None


def data_root(cfg) -> Path:
    d = cfg.data.data_dir
    if d is None:
        return SAMPLE_DIR
    p = Path(d).expanduser()
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def test_dir(cfg) -> Path:
    """``evaluate.test_dir``, else the test_instruction folder under the data root."""
    if cfg.evaluate.test_dir:
        p = Path(cfg.evaluate.test_dir).expanduser()
        return p if p.is_absolute() or p.exists() else REPO_ROOT / p
    return data_root(cfg) / IMHI_TEST_SUBDIR


def _resolve(p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() or q.exists() else REPO_ROOT / q


def _read_table(path: Path):
    import pandas as pd

    if not path.exists():
        raise FileNotFoundError(f"{path}: test set not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    if path.suffix in (".jsonl", ".json"):
        try:
            return pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON{' lines' if path.suffix == '.jsonl' else ''} ({e})") from None
    try:
        return pd.read_csv(path, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file") from None


def read_test_csv(path: Path, name: str | None = None, limit: int | None = None, query: str = QUERY,
                  gold: str = GOLD, task=None, classifier: str | None = None) -> TestSet:
    """One test file; a missing file or column, an empty file or an empty cell is an error that
    names the file, the column and the row (file line for CSV, record number for JSON lines)."""
    path = Path(path)
    df = _read_table(path)
    missing = [c for c in (query, gold) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {query!r} and {gold!r} "
                         f"(has {list(df.columns)[:8]}; a set in YAML names its columns with query:/gold:)")
    if df.empty:
        raise ValueError(f"{path}: no rows")
    first = 2 if path.suffix == ".csv" else 1
    for col in (query, gold):
        blank = df.index[df[col].isna() | (df[col].astype(str).str.strip() == "")].tolist()
        if blank:
            where = "row(s)" if path.suffix == ".csv" else "record(s)"
            raise ValueError(f"{path}: empty {col!r} at {where} {[i + first for i in blank[:5]]}")
    if limit:
        df = df.head(limit)
    return TestSet(name or path.stem, path, df[query].astype(str).tolist(), df[gold].astype(str).tolist(),
                   task, classifier)


def _imhi_task(name: str):
    from phyassist.evaluate.labels import TASKS

    return TASKS.get(name)


def load_test_sets(cfg) -> list[TestSet]:
    """The configured sets: names under the test folder, paths to CSV files, or YAML mappings."""
    from phyassist.evaluate.labels import task_from_spec

    folder = test_dir(cfg)
    out = []
    for s in cfg.evaluate.sets:
        if not isinstance(s, str):
            task = task_from_spec(s.name, s.classes, s.default_class) if s.classes else None
            out.append(read_test_csv(_resolve(s.file), s.name, cfg.evaluate.max_examples, s.query, s.gold,
                                     task, s.classifier))
            continue
        p = Path(s)
        name = p.stem if p.suffix == ".csv" else s
        path = _resolve(s) if p.suffix == ".csv" else folder / f"{s}.csv"
        out.append(read_test_csv(path, name, cfg.evaluate.max_examples, task=_imhi_task(name)))
    return out
