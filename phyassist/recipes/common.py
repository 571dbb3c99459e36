"""Pieces the recipe steps share: where each step writes, trainer settings derived from the run
config, LoRA configs and resuming."""

from __future__ import annotations

import shutil
from pathlib import Path


def step_dir(cfg, step: str) -> Path:
    """``<out>/<step>``: sft, reward, rl, predict."""
    return cfg.out / step


def images_dir(cfg) -> Path:
    """Plots of a run: ``recipe.images_dir`` when set (the committed images/recipes/...), else <out>/images."""
    return Path(cfg.recipe.images_dir) if cfg.recipe.images_dir else cfg.out / "images"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_flags(cfg) -> dict:
    """bf16 on a GPU when the train section asks for it (fp16 where bf16 is unsupported); fp32 on CPU."""
    import torch

    if not has_cuda() or not cfg.train.bf16:
        return {"bf16": False, "fp16": False}
    bf16_ok = torch.cuda.is_bf16_supported()
    return {"bf16": bf16_ok, "fp16": not bf16_ok}


def report_to(cfg) -> str:
    return "wandb" if cfg.wandb.mode in ("online", "offline") else "none"


def trainer_common(cfg, output_dir: Path) -> dict:
    """Arguments every recipe trainer takes the same way."""
    return dict(output_dir=str(output_dir), seed=cfg.seed, report_to=report_to(cfg), use_cpu=not has_cuda(),
                save_total_limit=2, dataloader_num_workers=0, **precision_flags(cfg))


def lora_config(spec, task_type: str):
    """A PEFT LoRA config from a recipe LoRA section (``CAUSAL_LM`` or ``SEQ_CLS``)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), bias="none", task_type=task_type)


def save_folder(target: Path, write) -> Path:
    """Write a folder through a temporary sibling, renamed into place only when complete."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
