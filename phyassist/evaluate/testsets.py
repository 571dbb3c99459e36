"""IMHI test sets: ``<SET>.csv`` files with columns ``query`` and ``gpt-3.5-turbo`` (the gold)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phyassist.paths import REPO_ROOT, SAMPLE_DIR

QUERY, GOLD = "query", "gpt-3.5-turbo"
IMHI_TEST_SUBDIR = Path("MentalLLaMA") / "test_data" / "test_instruction"


@dataclass
class TestSet:
    name: str
    path: Path
    queries: list[str]
    goldens: list[str]


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


def read_test_csv(path: Path, name: str | None = None, limit: int | None = None) -> TestSet:
    """One test file; a missing file or column, an empty file or an empty cell is an error."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: test set not found")
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file") from None
    missing = [c for c in (QUERY, GOLD) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {QUERY!r} and {GOLD!r}")
    if df.empty:
        raise ValueError(f"{path}: no rows")
    for col in (QUERY, GOLD):
        blank = df.index[df[col].astype(str).str.strip() == ""].tolist()
        if blank:
            raise ValueError(f"{path}: empty {col!r} at row(s) {[i + 2 for i in blank[:5]]}")
    if limit:
        df = df.head(limit)
    return TestSet(name or path.stem, path, df[QUERY].astype(str).tolist(), df[GOLD].astype(str).tolist())


def load_test_sets(cfg) -> list[TestSet]:
    """The configured sets: names under the test folder, or paths to CSV files."""
    folder = test_dir(cfg)
    out = []
    for s in cfg.evaluate.sets:
        p = Path(s)
        path = p if p.suffix == ".csv" else folder / f"{s}.csv"
        out.append(read_test_csv(path, p.stem if p.suffix == ".csv" else s, cfg.evaluate.max_examples))
    return out
