"""The one inference loader: base model as the config's ``model`` section says, LoRA adapters
attached, left-padded tokenizer. Evaluation, the app, the chat CLI and the recipes all load
through :func:`load_for_inference`.

Several adapters can be active at once (SFT + RL). PEFT sums the active adapters' updates on each
adapted layer: ``W x + Σ_i B_i A_i x · s_i``. The RL adapter was trained on the SFT-merged
weights ``W + ΔW_sft``; stacking SFT and RL on the unmerged base computes
``(W + ΔW_sft) x + ΔW_rl x``, the same function, without writing a merged copy of the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Written by the trainer beside each checkpoint and adapter: which base model it was trained on.
ADAPTER_META = "phyassist_train.json"
# The weights file of a PEFT adapter folder, as PEFT saves it (safetensors, or the older pickle).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_weights_file(path: str | Path) -> Path | None:
    """The weights file of the adapter folder ``path`` (None: not there, e.g. a copy without weights)."""
    return next((Path(path) / n for n in ADAPTER_WEIGHTS if (Path(path) / n).is_file()), None)


class AdapterMismatchError(ValueError):
    """An adapter trained on another base model than the one configured."""


def model_identity(mcfg) -> str:
    """The base model as recorded in :data:`ADAPTER_META`: name, plus ``@revision`` when pinned."""
    return mcfg.name if mcfg.revision is None else f"{mcfg.name}@{mcfg.revision}"


def adapter_names(paths: list[str | Path]) -> list[str]:
    """A distinct PEFT adapter name per folder of a stack (``sft``, ``rl``, ``adapter_2`` ...)."""
    names = []
    for p in paths:
        stem = Path(p).name if Path(p).name != "adapter" else Path(p).parent.name
        base = re.sub(r"\W+", "_", stem).strip("_") or "adapter"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def check_adapter(path: str | Path, mcfg=None) -> Path:
    """``path`` as a Path, if it is a PEFT adapter folder made (as far as it records) for ``mcfg``'s
    base model; else an error naming the folder."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    meta = path / ADAPTER_META
    if mcfg is not None and meta.exists():
        base = json.loads(meta.read_text(encoding="utf-8")).get("base_model")
        if base and base != model_identity(mcfg):
            raise AdapterMismatchError(f"{path}: adapter was trained on {base!r}, not {model_identity(mcfg)!r}")
    return path


def attach(model, paths: list[str | Path], mcfg=None):
    """Load every adapter onto ``model`` and activate them all together; returns the PeftModel
    (``model`` itself when ``paths`` is empty). A lone adapter keeps PEFT's name ``default``; a stack's
    are named after their folders."""
    from peft import PeftModel

    paths = [check_adapter(p, mcfg) for p in paths]
    if not paths:
        return model
    names = adapter_names(paths) if len(paths) > 1 else ["default"]
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


def load_for_inference(cfg, adapters: str | Path | list[str | Path] | None = None):
    """(model in eval mode with ``adapters`` active, left-padded tokenizer) as ``cfg.model`` says.

    ``adapters``: None, one adapter folder, or a list of them (stacked, all active)."""
    from phyassist.models.loading import load_model, load_tokenizer

    paths = [] if adapters is None else [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    paths = [check_adapter(p, cfg.model) for p in paths]  # before the (long) model load
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    model = attach(load_model(cfg.model, for_training=False), paths, cfg.model)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer
