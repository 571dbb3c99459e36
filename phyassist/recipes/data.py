"""A recipe's data step: dialogue files -> ``<out>/data/{train,val,test}.jsonl`` of chat records,
with per-split sample counts and the kit's cleaning report.

Splits come from the configured files (``recipe.data.files``: split -> file); a missing
validation or test file is carved out of train with a seeded hold-out.
"""

from __future__ import annotations

from pathlib import Path

from phyassist.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from phyassist.paths import SAMPLE_DIR
from phyassist.recipes import dialogues as dlg

RECIPE_SAMPLES = SAMPLE_DIR / "recipes"
DEFAULT_FILES = {
    "soulchat": {"train": "SoulChatCorpus-sft-multi-Turn.json"},
    "covid": {"train": "train_data.json", "validate": "validate_data.json", "test": "test_data.json"},
}
# What the case study reported after its own (unpublished) filtering, for the counts report.
CASE_STUDY_COUNTS = {"covid": {"train": 3471, "validate": 333, "test": 410}}


def data_root(cfg) -> Path:
    """The configured folder (downloaded first when asked) or the bundled sample of the recipe."""
    rc = cfg.recipe
    if rc.data.download:
        from phyassist.recipes import download

        fetch = {"soulchat": download.download_soulchat, "covid": download.download_covid}[rc.kind]
        args = (rc.data.path,) + ((rc.data.source,) if rc.data.source else ())
        return fetch(*args)
    if rc.data.path:
        return Path(rc.data.path).expanduser()
    return RECIPE_SAMPLES / rc.kind


def split_files(cfg) -> dict[str, Path]:
    root = data_root(cfg)
    if root.is_file():
        return {"train": root}
    files = cfg.recipe.data.files or DEFAULT_FILES[cfg.recipe.kind]
    if "train" not in files:
        raise ValueError("recipe.data.files: needs a 'train' entry (split -> file name)")
    out = {split: root / name for split, name in files.items() if name}
    for split, path in out.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {split} file of recipe.data not found "
                                    f"(set recipe.data.path / recipe.data.files, or recipe.data.download)")
    return out


def raw_assistant_turns(convs: list[dict]) -> int:
    return sum(m["role"] == "assistant" for c in convs for m in c["messages"])


def load_split(cfg, split: str, path: Path) -> tuple[list[dict], dict]:
    """Conversations of one file -> samples (whole conversations or one per assistant turn)."""
    d = cfg.recipe.data
    convs = dlg.conversations(dlg.load_json_records(path), d.format, f"{path.name}", d.system_prompt,
                              d.user_prefix, d.assistant_prefix)
    convs = [c for c in convs if any(m["role"] == "assistant" for m in c["messages"])]
    if d.unit == "turn":
        samples = [s for c in convs for s in dlg.turn_samples(c, d.max_history_turns)]
    else:
        samples = convs
    kept, dropped = dlg.filter_samples(samples, d.min_response_chars, d.max_chars)
    stats = {"file": str(path), "dialogues": len(convs), "assistant_turns": raw_assistant_turns(convs),
             "samples": len(samples), "dropped": dropped, "kept": len(kept)}
    return kept, stats


def build_splits(cfg) -> tuple[dict[str, list[dict]], dict]:
    """All splits, with the seeded validation/test hold-outs carved from train when no file: whole
    dialogues are held out, so no dialogue has turns on both sides."""
    d, seed = cfg.recipe.data, cfg.seed
    splits, stats = {}, {}
    for split, path in split_files(cfg).items():
        splits[split], stats[split] = load_split(cfg, split, path)
    if "test" not in splits and d.test_fraction > 0:
        splits["train"], splits["test"] = dlg.split_off_dialogues(splits["train"], d.test_fraction, seed)
    splits["train"], splits["val"] = dlg.split_off_dialogues(splits["train"], d.val_fraction, seed + 1)
    for split in list(splits):
        splits[split] = dlg.seeded_cap(splits[split], d.max_samples, seed)
    return splits, stats


def counts_markdown(kind: str, counts: dict[str, int], stats: dict) -> str:
    lines = [f"# Recipe {kind}: samples per split", "",
             "| split | file | dialogues | assistant turns | samples | dropped | written |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for split, n in counts.items():
        s = stats.get(split, {})
        dropped = ", ".join(f"{k}: {v}" for k, v in s.get("dropped", {}).items()) or "0"
        lines.append(f"| {split} | {Path(s['file']).name if s else '(held out of train)'} | "
                     f"{s.get('dialogues', '-')} | {s.get('assistant_turns', '-')} | {s.get('samples', '-')} | "
                     f"{dropped if s else '-'} | {n} |")
    lines += ["", "`written` counts the samples left after the kit's cleaning rules (cleaning_report.md)."]
    ref = CASE_STUDY_COUNTS.get(kind)
    if ref:
        lines += ["", "The case study reported " + " / ".join(f"{v:,} {k}" for k, v in ref.items()) +
                  " samples after a filtering it does not describe. This kit keeps every doctor turn "
                  "with a non-empty answer (each with all earlier turns as history), so its counts are the "
                  "raw doctor-turn counts of the files; the `val` split is the 5 % of the train dialogues "
                  "held out (whole dialogues) for SFT validation. `recipe.data.max_chars`, `min_response_chars` and `max_history_turns` "
                  "filter further when set."]
    return "\n".join(lines) + "\n"


def prepare(cfg) -> dict:
    """Write the recipe's splits, counts and cleaning report under ``<out>/data``."""
    if cfg.recipe.kind is None:
        raise ValueError("recipe.kind is not set (soulchat or covid)")
    splits, stats = build_splits(cfg)
    splits, cleaning = clean_splits(cfg, splits)
    out = cfg.out / "data"
    for split, rows in splits.items():
        atomic_write_jsonl(out / f"{split}.jsonl", rows)
    counts = {s: len(r) for s, r in splits.items()}
    summary = {"kind": cfg.recipe.kind, "counts": counts, "files": stats,
               "case_study_counts": CASE_STUDY_COUNTS.get(cfg.recipe.kind)}
    atomic_write_json(out / "counts.json", summary)
    atomic_write_text(out / "counts.md", counts_markdown(cfg.recipe.kind, counts, stats))
    summary["cleaning"] = cleaning
    return summary


def clean_splits(cfg, splits: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], dict]:
    """The kit's cleaning rules (phyassist.data.clean) on every message, with its report."""
    from phyassist.recipes.cleaning import clean_dialogue_splits

    return clean_dialogue_splits(cfg, splits, cfg.out / "data")


def read_split(cfg, split: str) -> list[dict]:
    from phyassist.io import read_jsonl

    path = cfg.out / "data" / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run the recipe's data step first (python -m phyassist recipe "
                                f"--config ... --steps data)")
    return read_jsonl(path)
