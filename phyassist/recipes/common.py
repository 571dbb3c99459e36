"""Pieces the recipe steps share: where each step writes, trainer settings derived from the run
config, LoRA configs and resuming."""

from __future__ import annotations

import shutil
from pathlib import Path

from phyassist.models.inference import ADAPTER_WEIGHTS, adapter_weights_file


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


def adapter_problem(adapter_dir, what: str = "adapter") -> str | None:
    """Why ``adapter_dir`` cannot be loaded (no folder, no config, no weights, as in a run folder copied
    without its weights); None when it can."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        return f"no {what} at {adapter_dir} (no adapter_config.json)"
    if adapter_weights_file(adapter_dir) is None:
        return (f"the {what} at {adapter_dir} has no weights ({' / '.join(ADAPTER_WEIGHTS)} missing, e.g. a run "
                f"folder copied without its weights)")
    return None


def adapter_fingerprint(adapter_dir) -> str:
    """A short hash of an adapter's weights: ties a cached result to the adapter that made it."""
    import hashlib

    weights = adapter_weights_file(adapter_dir)
    if weights is None:
        raise FileNotFoundError(adapter_problem(adapter_dir))
    h = hashlib.sha1()
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def text_key(*parts) -> str:
    """A short hash of JSON-able parts (prompts, answers, settings): a changed input is noticed."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def scoring_device(cfg):
    """Where a model used for inference inside a recipe step (reward scoring, SFT samples) runs: the
    process's GPU when there is one and ``model.device_map`` is not ``cpu``, else the CPU."""
    import os

    import torch

    if cfg.model.device_map == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def free_accelerator_memory() -> None:
    """Give a dropped model's GPU memory back before the next model loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
