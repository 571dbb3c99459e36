"""Checks before a training run starts: the hardware fits the projection, and a checkpoint to
resume from belongs to the configured base model."""

from __future__ import annotations

import json
from pathlib import Path

from phyassist.models.inference import ADAPTER_META, model_identity


class TrainSetupError(ValueError):
    """A training run that cannot start as configured; the message says what to change."""


def check_hardware(cfg) -> None:
    """Refuse a GPU profile on a machine without GPUs, or with too little memory (say how much)."""
    import torch

    m = cfg.model
    wants_gpu = m.device_map != "cpu" and (m.num_gpus or m.max_memory_per_gpu)
    if wants_gpu and not torch.cuda.is_available():
        raise TrainSetupError(
            f"profile '{cfg.name}' trains {m.name} on {m.num_gpus or 'the'} GPU(s) but no CUDA GPU is visible. "
            "Run `python -m phyassist train --config <profile> --dry-run` to see the memory it needs, "
            "or `--config smoke` to train the embedded default on the CPU.")
    if not torch.cuda.is_available() or not cfg.train.check_memory:
        return
    from phyassist.train.dryrun import project

    proj = project(cfg)
    n = min(m.num_gpus or torch.cuda.device_count(), torch.cuda.device_count())
    have = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30
    need = proj.per_gpu_gib(n)
    if need > have:
        kept = "" if not proj.kept_weights_gib else (
            f", or with fewer kept dequantized experts (model.quant.keep_dequantized_layers="
            f"{m.quant.keep_dequantized_layers} holds {proj.kept_weights_gib:.1f} GiB)")
        raise TrainSetupError(
            f"{m.name} needs about {need:.1f} GiB per GPU on {n} GPU(s) (projection: "
            f"{proj.summary_line()}), but the smallest GPU here has {have:.1f} GiB. "
            f"It would fit on {proj.gpus_needed(have)} such GPU(s), or with a smaller micro-batch{kept}.")


def last_checkpoint(ckpt_dir: Path, cfg) -> str | None:
    """The newest checkpoint to resume from, refusing one made for another base model."""
    from phyassist.io import last_complete_checkpoint

    if not cfg.train.resume:
        return None
    last = last_complete_checkpoint(ckpt_dir)
    if last is None:
        return None
    meta = Path(last) / ADAPTER_META
    if meta.exists():
        base = json.loads(meta.read_text(encoding="utf-8")).get("base_model")
        if base != model_identity(cfg.model):
            raise TrainSetupError(
                f"{last}: checkpoint was trained on base model {base!r}, this run uses "
                f"{model_identity(cfg.model)!r}. Use another --output-dir, or set train.resume=false "
                f"to start over (the old checkpoints are then replaced).")
    return last
