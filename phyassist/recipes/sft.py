"""A recipe's SFT step: the kit's trainer (:func:`phyassist.train.trainer.train`) on chat records,
evaluated every ``train.eval_steps`` on the held-out validation split.

The best checkpoint is kept the one way the trainer keeps it: ``train.load_best_model_at_end``
(lowest ``train.metric_for_best_model``, eval loss by default). The best checkpoint is never rotated
out by ``train.save_total_limit`` and training ends with its weights, so ``<out>/sft/adapter`` IS the
best adapter; its ``phyassist_train.json`` names the checkpoint and the metric.
"""

from __future__ import annotations

import json
from pathlib import Path

from phyassist.recipes.common import images_dir, step_dir


def chat_records(records: list[dict]) -> list[dict]:
    return [{"messages": r["messages"]} for r in records]


def sft_adapter_path(cfg) -> Path:
    """The adapter later steps use: recipe.sft_adapter, else <out>/sft/adapter (the best one when
    train.load_best_model_at_end is on)."""
    if cfg.recipe.sft_adapter:
        return Path(cfg.recipe.sft_adapter)
    return step_dir(cfg, "sft") / "adapter"


def adapter_info(adapter: Path) -> dict:
    """What the trainer recorded about an adapter: weights (best/final), best checkpoint and metric."""
    from phyassist.models.inference import ADAPTER_META

    meta = Path(adapter) / ADAPTER_META
    return json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}


def train_sft(cfg, train_records: list[dict], val_records: list[dict]) -> Path:
    from phyassist.recipes.plots import plot_curves
    from phyassist.train.plots import read_history
    from phyassist.train.trainer import train

    out = step_dir(cfg, "sft")
    evaluating = bool(val_records) and cfg.train.eval_steps
    adapter = train(cfg, train_records=chat_records(train_records),
                    eval_records=chat_records(val_records) if evaluating else None, output_dir=out)
    history = read_history(out / "checkpoints" / "trainer_state.json")  # includes resumed steps
    plot_curves(history, {"loss": "train loss", "eval_loss": "validation loss"},
                f"SFT loss ({cfg.name})", images_dir(cfg) / "sft_loss.png", "loss")
    info = adapter_info(adapter)
    print(f"[recipe] sft adapter: {info.get('weights', 'final')} weights (best checkpoint "
          f"{info.get('best_checkpoint')}, {cfg.train.metric_for_best_model} {info.get('best_metric')})", flush=True)
    return sft_adapter_path(cfg)
