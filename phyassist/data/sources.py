"""Where each source lives (the MentalLLaMA and counsel-chat layouts), how its columns map to
question/answer, and which split is read. A missing file names itself and where to get it."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from phyassist.data.records import DataError, Row
from phyassist.data.schema import DataConfig, SourceConfig
from phyassist.data.tables import columns_of, read_table, require_columns
from phyassist.paths import REPO_ROOT, SAMPLE_DIR

MENTALLLAMA = "MentalLLaMA"
COUNSEL_CHAT_FILE = "counsel-chat/20200325_counsel_chat.csv"
INSTRUCTION_COLUMNS = ["query", "gpt-3.5-turbo"]
COMPLETE_COLUMNS = ["post", "question", "response"]
COUNSEL_COLUMNS = ["questionTitle", "questionText", "answerText"]

# File names upstream uses in complete_data/<SET>/ (they differ per set).
_COMPLETE_NAMES = {"train": ["train.csv", "reddit_train.csv", "dreaddit-train.csv"],
                   "val": ["val.csv", "reddit_valid.csv", "valid.csv"]}

# kind -> columns that identify it (for scripts/gen_csv.py); checked in this order.
SIGNATURES = [("imhi", INSTRUCTION_COLUMNS), ("imhi_complete", COMPLETE_COLUMNS),
              ("counsel_chat", COUNSEL_COLUMNS), ("table", ["question", "answer"])]


class MissingDataError(DataError, FileNotFoundError):
    """A source file that is not there; the message says where to get it."""


def resolve_dir(path: str | None) -> Path:
    """``None`` -> bundled sample; relative paths -> the working directory, else the repo."""
    if path is None:
        return SAMPLE_DIR
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def imhi_set(src: SourceConfig) -> tuple[str, str]:
    """(IMHI set name, variant): ``DR_complete`` means set DR, complete variant."""
    if src.name.endswith("_complete"):
        return src.name[: -len("_complete")], "complete"
    return src.name, src.variant


def imhi_candidates(set_name: str, variant: str, split: str) -> list[str]:
    """Paths (relative to the data root) where a set's split may live, upstream's layout."""
    if split == "test":
        folder = "test_instruction" if variant == "instruction" else "test_complete"
        return [f"{MENTALLLAMA}/test_data/{folder}/{set_name}.csv"]
    if variant == "instruction":
        return [f"{MENTALLLAMA}/train_data/instruction_data/{set_name}/{split}.csv"]
    return [f"{MENTALLLAMA}/train_data/complete_data/{set_name}/{n}" for n in _COMPLETE_NAMES[split]]


def test_dir(dcfg: DataConfig) -> Path:
    return resolve_dir(dcfg.test_dir) if dcfg.test_dir else \
        resolve_dir(dcfg.data_dir) / MENTALLLAMA / "test_data" / "test_instruction"


def where_to_get(src: SourceConfig, dcfg: DataConfig, rel: str) -> str:
    if src.kind == "counsel_chat":
        return (f"get it from {dcfg.counsel_chat_url} (or the Hub data set nbertagnolli/counsel-chat), "
                "or set data.download=true")
    if src.kind == "imhi":
        return f"get it from {dcfg.mentalllama_url}/{rel}, or set data.download=true"
    return "check the source's path in the config"


@dataclass(frozen=True)
class Located:
    path: Path
    split: str  # the split actually read
    note: str = ""  # e.g. "train split missing; using val (data.fallback_split)"


def _first_existing(root: Path, rels: list[str]) -> Path | None:
    return next((root / r for r in rels if (root / r).is_file()), None)


def locate(src: SourceConfig, dcfg: DataConfig, fetch=None) -> Located:
    """The file to read for ``src``; ``fetch(src, rel_paths) -> Path | None`` downloads when enabled.

    A missing train split falls back to ``data.fallback_split`` (val) when the config allows;
    never to a test split.
    """
    root = resolve_dir(dcfg.data_dir)
    if src.path:
        p = Path(src.path).expanduser()
        cands = [p] if p.is_absolute() else [root / p, Path.cwd() / p, REPO_ROOT / p]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            looked = "" if p.is_absolute() else " (looked in " + ", ".join(
                dict.fromkeys(str(c.parent) for c in cands)) + ")"
            raise MissingDataError(f"{src.path}: file not found (source {src.name!r}){looked}; check the "
                                   "source's path, or leave it out to read the kit's usual location")
        return Located(found, src.split)
    if src.kind == "counsel_chat":
        rels = {s: [COUNSEL_CHAT_FILE] for s in ("train", "val", "test")}
    else:
        name, variant = imhi_set(src)
        rels = {s: imhi_candidates(name, variant, s) for s in ("train", "val", "test")}

    def find(split: str) -> Path | None:
        hit = _first_existing(root, rels[split])
        if hit is None and fetch is not None:
            hit = fetch(src, rels[split])
        return hit

    hit = find(src.split)
    if hit is not None:
        return Located(hit, src.split)
    wanted = root / rels[src.split][0]
    if src.split == "train" and dcfg.fallback_split and src.kind == "imhi":
        alt = find(dcfg.fallback_split)
        if alt is not None:
            note = (f"{src.name}: train split missing ({wanted}); using the {dcfg.fallback_split} split "
                    f"{alt} instead (data.fallback_split)")
            return Located(alt, dcfg.fallback_split, note)
    hint = where_to_get(src, dcfg, rels[src.split][0])
    fallback = "" if src.split != "train" or src.kind != "imhi" else (
        "; data.fallback_split is off" if not dcfg.fallback_split else
        f"; the {dcfg.fallback_split} split is missing too")
    raise MissingDataError(f"{wanted}: file not found (source {src.name!r}, split {src.split}){fallback}; {hint}")


# --- column mapping ---------------------------------------------------------------------------

_POST_PATTERNS = [re.compile(r'^Consider this post:\s*"(.*)"\s*Question:', re.S),
                  re.compile(r"^Post:\s*(.*?)\s*Question:", re.S)]


_NON_WORD = re.compile(r"[\W_]+")


@functools.lru_cache(maxsize=1 << 16)
def normalise(text: str) -> str:
    """Comparison key: Unicode-normalised, case-folded, punctuation and spacing ignored.
    Letters of every script are kept (Chinese is content)."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def post_of(question: str) -> str:
    """The social-media post inside an IMHI query (the question when there is none)."""
    for pat in _POST_PATTERNS:
        m = pat.match(question.strip())
        if m:
            return m.group(1)
    return question


def group_of(row: Row) -> str:
    """Rows of one group never straddle train and val, and a test item's group marks leakage:
    the source's own id when it has one (counsel-chat's questionID), else the normalised post
    (IMHI asks several questions about one post)."""
    return row.group or normalise(post_of(row.question))


def recognise(path: Path, columns: list[str]) -> str:
    """Which source a file is, from its columns (for gen_csv)."""
    have = set(columns)
    for kind, needed in SIGNATURES:
        if set(needed) <= have:
            return kind
    known = "; ".join(f"{k}: {', '.join(c)}" for k, c in SIGNATURES)
    raise DataError(f"{path}: cannot tell which source this is from its columns {columns}; "
                    f"expected one of [{known}] or pass --source")


def _counsel_question(title: str, text: str) -> str:
    title, text = title.strip(), text.strip()
    if not title or normalise(text).startswith(normalise(title)):
        return text
    return f"{title}\n\n{text}" if text else title


def map_rows(path: Path, records: list[tuple[int, dict]], src: SourceConfig) -> list[Row]:
    """Records -> question/answer rows, per the source's kind."""
    kind = src.kind
    if kind == "imhi":
        kind = "imhi_complete" if imhi_set(src)[1] == "complete" else "imhi"
        if kind == "imhi_complete" and set(INSTRUCTION_COLUMNS) <= set(columns_of(records)):
            kind = "imhi"  # test_complete files use the instruction columns
    origin = path.name if path.parent == Path(".") else f"{path.parent.name}/{path.name}"
    out = []
    if kind == "imhi":
        require_columns(path, records, INSTRUCTION_COLUMNS)
        for line, r in records:
            q = r["query"]
            out.append(Row(src.name, q, r["gpt-3.5-turbo"], f"{origin}:{line}"))
    elif kind == "imhi_complete":
        require_columns(path, records, COMPLETE_COLUMNS)
        for line, r in records:
            post = r["post"].strip()
            q = f"{post} {r['question'].strip()}".strip()
            out.append(Row(src.name, q, r["response"], f"{origin}:{line}"))
    elif kind == "counsel_chat":
        require_columns(path, records, COUNSEL_COLUMNS)
        for line, r in records:  # its own split column is kept for the held-out-split rule
            q = _counsel_question(r["questionTitle"], r["questionText"])
            group = r.get("questionID") or normalise(q)
            out.append(Row(src.name, q, r["answerText"], f"{origin}:{line}", f"counsel-{group}",
                           {"split": (r.get("split") or "").strip().lower()}))
    else:
        qcol, acol = src.question_column or "question", src.answer_column or "answer"
        require_columns(path, records, [qcol, acol])
        for line, r in records:
            q = r[qcol]
            out.append(Row(src.name, q, r[acol], f"{origin}:{line}"))
    return out


def load_rows(src: SourceConfig, located: Located) -> list[Row]:
    return map_rows(located.path, read_table(located.path), src)


def source_for_file(path: Path, name: str | None = None, kind: str | None = None) -> tuple[SourceConfig, list[Row]]:
    """Read any supported file, recognising its source by columns unless ``kind`` is given."""
    records = read_table(path)
    kind = kind or recognise(path, columns_of(records))
    variant = "instruction"
    if kind == "imhi_complete":
        kind, variant = "imhi", "complete"
    if kind not in ("imhi", "counsel_chat", "table"):
        raise DataError(f"unknown source {kind!r}; choose one of imhi, imhi_complete, counsel_chat, table")
    src = SourceConfig(name=name or (path.parent.name if kind == "imhi" else path.stem), kind=kind,
                       variant=variant, path=str(path) if kind == "table" else None)
    return src, map_rows(path, records, src)
