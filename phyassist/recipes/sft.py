"""A recipe's SFT step: the kit's trainer (:func:`phyassist.train.trainer.train`) on chat records,
evaluated every ``train.eval_steps`` on the held-out validation split, keeping the best adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from phyassist.io import atomic_write_json
from phyassist.recipes.common import images_dir, save_folder, step_dir


class BestAdapterCallback(TrainerCallback):
    """After each evaluation, save the adapter when the validation loss is the lowest so far.

    The best loss is kept in ``best.json`` beside the adapter so a resumed run compares against it.
    """

    def __init__(self, folder: Path, metric: str = "eval_loss"):
        self.folder, self.metric = Path(folder), metric
        meta = self.folder.with_name(self.folder.name + ".json")
        self.meta_path = meta
        self.best = json.loads(meta.read_text())["value"] if meta.exists() else float("inf")

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or model is None or value >= self.best:
            return
        self.best = value
        save_folder(self.folder, model.save_pretrained)
        atomic_write_json(self.meta_path, {"metric": self.metric, "value": value, "step": state.global_step})


def chat_records(records: list[dict]) -> list[dict]:
    return [{"messages": r["messages"]} for r in records]


def sft_adapter_path(cfg) -> Path:
    """The adapter later steps use: recipe.sft_adapter, else the best one, else the final one."""
    if cfg.recipe.sft_adapter:
        return Path(cfg.recipe.sft_adapter)
    out = step_dir(cfg, "sft")
    best = out / "best_adapter"
    return best if cfg.recipe.sft_load_best and (best / "adapter_config.json").exists() else out / "adapter"


def train_sft(cfg, train_records: list[dict], val_records: list[dict]) -> Path:
    from phyassist.recipes.plots import plot_curves
    from phyassist.train.plots import read_history
    from phyassist.train.trainer import train

    out = step_dir(cfg, "sft")
    callbacks = []
    evaluating = bool(val_records) and cfg.train.eval_steps
    if evaluating and cfg.recipe.sft_load_best:
        callbacks.append(BestAdapterCallback(out / "best_adapter"))
    train(cfg, train_records=chat_records(train_records),
          eval_records=chat_records(val_records) if evaluating else None, output_dir=out, callbacks=callbacks)
    history = read_history(out / "checkpoints" / "trainer_state.json")  # includes resumed steps
    plot_curves(history, {"loss": "train loss", "eval_loss": "validation loss"},
                f"SFT loss ({cfg.name})", images_dir(cfg) / "sft_loss.png", "loss")
    return sft_adapter_path(cfg)
