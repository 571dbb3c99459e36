"""Preference pairs for the reward model, as TRL's conversational format.

Reads comparison_gpt4_data_zh's layout (``instruction``, ``input``, ``output: [chosen, rejected]``)
or plain ``prompt``/``chosen``/``rejected`` records; writes ``{prompt: [user], chosen: [assistant],
rejected: [assistant]}`` so the reward model sees the same chat template as the policy.
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


def load_preferences(cfg) -> tuple[list[dict], list[dict]]:
    """(train, val) conversational preference records; identical chosen/rejected pairs are dropped."""
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
