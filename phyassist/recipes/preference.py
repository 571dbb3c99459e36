"""Preference pairs for the reward model, as TRL's conversational format.

``recipe.preference.source: file`` reads comparison_gpt4_data_zh's layout (``instruction``,
``input``, ``output: [chosen, rejected]``) or plain ``prompt``/``chosen``/``rejected`` records and
makes ``{prompt: [user], chosen: [assistant], rejected: [assistant]}`` so the reward model sees the
same chat template as the policy. ``source: dialogues`` builds the pairs from the data step's
splits instead (:mod:`phyassist.recipes.pairs`), with the whole history as the prompt.
"""

from __future__ import annotations

from pathlib import Path

from phyassist.paths import SAMPLE_DIR
from phyassist.recipes.dialogues import load_json_records, seeded_cap, split_off

SAMPLE_PREFERENCES = SAMPLE_DIR / "recipes" / "preference" / "comparison_zh_sample.json"


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: must be non-empty text")
    return value.strip()


def to_pair(item, where: str) -> tuple[str, str, str]:
    """One source record -> (prompt, chosen, rejected)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    if {"prompt", "chosen", "rejected"} <= item.keys():
        return (_text(item["prompt"], f"{where}, field prompt"), _text(item["chosen"], f"{where}, field chosen"),
                _text(item["rejected"], f"{where}, field rejected"))
    out = item.get("output")
    if "instruction" in item and isinstance(out, list) and len(out) >= 2:
        prompt = "\n".join(x for x in (item.get("instruction") or "", item.get("input") or "") if x.strip())
        return (_text(prompt, f"{where}, field instruction"), _text(out[0], f"{where}, field output[0]"),
                _text(out[1], f"{where}, field output[1]"))
    raise ValueError(f"{where}: expected prompt/chosen/rejected or instruction/input/output[chosen, rejected]")


def conversational(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def preference_path(cfg) -> Path:
    p = cfg.recipe.preference
    if p.download:
        from phyassist.paths import cache_dir
        from phyassist.recipes.download import download_url

        return download_url(p.url, Path(p.path) if p.path else cache_dir() / "data" / Path(p.url).name)
    return Path(p.path).expanduser() if p.path else SAMPLE_PREFERENCES


def file_preferences(cfg) -> tuple[list[dict], list[dict]]:
    """(train, val) from the configured file; identical chosen/rejected pairs are dropped."""
    path = preference_path(cfg)
    rows = []
    for i, item in enumerate(load_json_records(path)):
        prompt, chosen, rejected = to_pair(item, f"{path}: record {i}")
        if chosen != rejected:
            rows.append(conversational(prompt, chosen, rejected))
    if not rows:
        raise ValueError(f"{path}: no usable preference pairs")
    rows = seeded_cap(rows, cfg.recipe.preference.max_samples, cfg.seed)
    return split_off(rows, cfg.recipe.preference.val_fraction, cfg.seed)


def dialogue_preferences(cfg) -> dict[str, list[dict]]:
    """Pairs built from every split the data step wrote (train, val, validate, test). With the
    ``sft_sample`` construction, the SFT model first answers the prompts assigned to it
    (:mod:`phyassist.recipes.sft_samples`: batched, cached)."""
    from phyassist.recipes.data import read_split
    from phyassist.recipes.pairs import build_preference_splits, generation_requests

    p, expand = cfg.recipe.preference, cfg.recipe.data.unit == "conversation"
    splits = {s: read_split(cfg, s) for s in ("train", "val", "validate", "test")
              if (cfg.out / "data" / f"{s}.jsonl").exists() or s == "train"}
    requests = [c for split, recs in splits.items() for c in generation_requests(recs, split, p, cfg.seed, expand)]
    generated, notes = None, []
    if requests:
        from phyassist.recipes.sft_samples import sft_samples

        generated, note = sft_samples(cfg, requests)
        notes += [note] if note else []
    return build_preference_splits(cfg, splits, generated, notes)


def preference_splits(cfg) -> dict[str, list[dict]]:
    """``train`` and ``val`` (seen by the reward trainer) and ``held_out`` (its accuracy is measured
    there): the test split's pairs when built from dialogues; the file's validation share else."""
    p = cfg.recipe.preference
    if p.source == "file":
        train, val = file_preferences(cfg)
        return {"train": train, "val": val, "held_out": val}
    built = dialogue_preferences(cfg)
    if not built["train"]:
        raise ValueError("recipe.preference: no training pair could be built from data/train.jsonl "
                         "(replies shorter than preference.min_reply_chars, or prompts over max_prompt_chars?)")
    return {"train": seeded_cap(built["train"], p.max_samples, cfg.seed),
            "val": seeded_cap(built.get("val", []), p.max_eval_pairs, cfg.seed),
            "held_out": seeded_cap(built.get("test") or built.get("validate") or [], p.max_held_out_pairs, cfg.seed)}


def load_preferences(cfg) -> tuple[list[dict], list[dict]]:
    """(train, val) conversational preference records for the reward trainer."""
    s = preference_splits(cfg)
    return s["train"], s["val"]
