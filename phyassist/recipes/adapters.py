"""Stacked LoRA adapters: the base model with several adapters active at once (SFT + RL).

PEFT sums the active adapters' updates on each adapted layer: ``W x + Σ_i B_i A_i x · s_i``.
The RL adapter was trained on the SFT-merged weights ``W + ΔW_sft``; stacking SFT and RL on the
unmerged base computes ``(W + ΔW_sft) x + ΔW_rl x``, the same function, without writing a merged
copy of the model. The chat CLI, the recipes' predict step and the main study share this loader.
"""

from __future__ import annotations

import re
from pathlib import Path


def adapter_names(paths: list[str | Path]) -> list[str]:
    """A distinct PEFT adapter name per folder (``sft``, ``rl``, ``adapter_2`` ...)."""
    names = []
    for p in paths:
        stem = Path(p).name if Path(p).name != "adapter" else Path(p).parent.name
        base = re.sub(r"\W+", "_", stem).strip("_") or "adapter"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def check_adapter(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    return path


def attach(model, paths: list[str | Path]):
    """Load every adapter onto ``model`` and activate them all together; returns the PeftModel."""
    from peft import PeftModel

    paths = [check_adapter(p) for p in paths]
    if not paths:
        return model
    names = adapter_names(paths)
    model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(str(path), adapter_name=name)
    activate(model, names)
    return model


def activate(model, names: list[str]) -> None:
    """Make exactly ``names`` the active adapters (PeftModel.set_adapter takes one name only)."""
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    for p in model.parameters():
        p.requires_grad_(False)


def load_stacked(cfg, adapter_paths: list[str | Path]):
    """(model in eval mode with all adapters active, left-padded tokenizer) as ``cfg.model`` says."""
    from phyassist.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model, padding_side="left")
    model = attach(load_model(cfg.model, for_training=False), list(adapter_paths))
    model.eval()
    return model, tok
