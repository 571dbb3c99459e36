"""Reward model: the base model with a scalar head and a LoRA adapter, trained on preference pairs
with TRL's RewardTrainer (Bradley-Terry loss: chosen should score above rejected).

The adapter (with the head, saved as a PEFT ``modules_to_save``) goes to ``<out>/reward/adapter``;
:func:`load_reward_model` merges it back for scoring, which is how the RL step uses it.
"""

from __future__ import annotations

from pathlib import Path

from phyassist.io import atomic_write_json, last_complete_checkpoint
from phyassist.recipes.common import (images_dir, lora_config, save_folder, step_dir,
                                      trainer_common)


def reward_base(cfg) -> str:
    return cfg.recipe.reward.model or cfg.model.name


def load_reward_base(cfg, name: str | None = None):
    """(sequence-classification model with one output, tokenizer) for the configured base."""
    from transformers import AutoModelForSequenceClassification

    from phyassist.models.loading import load_tokenizer, torch_dtype
    from phyassist.models.registry import resolve_model_path

    mcfg = cfg.model.model_copy(update={"name": name or reward_base(cfg)})
    tok = load_tokenizer(mcfg, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(mcfg.name), num_labels=1, dtype=torch_dtype(mcfg.dtype),
        local_files_only=mcfg.local_files_only or None)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def reward_args(cfg, output_dir: Path, has_eval: bool):
    from trl import RewardConfig

    r = cfg.recipe.reward
    return RewardConfig(
        learning_rate=r.learning_rate, num_train_epochs=r.num_train_epochs, max_steps=r.max_steps,
        per_device_train_batch_size=r.per_device_train_batch_size,
        per_device_eval_batch_size=r.per_device_eval_batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps, lr_scheduler_type=r.lr_scheduler_type,
        max_length=r.max_length, logging_steps=r.logging_steps, logging_first_step=True, save_steps=r.save_steps,
        eval_strategy="epoch" if has_eval else "no", gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False}, **trainer_common(cfg, output_dir))


TRAINER_COLUMNS = ("prompt", "chosen", "rejected")


def trainer_rows(rows: list[dict]) -> list[dict]:
    """Only the columns the trainer reads (built pairs also carry construction, dialogue, donor)."""
    return [{k: r[k] for k in TRAINER_COLUMNS} for r in rows]


def train_reward(cfg, train_rows: list[dict], eval_rows: list[dict] | None = None) -> Path:
    """Train the reward adapter; resumes from ``<out>/reward/checkpoints``. Returns the adapter folder."""
    from datasets import Dataset
    from trl import RewardTrainer

    from phyassist.recipes.plots import plot_curves

    out = step_dir(cfg, "reward")
    model, tok = load_reward_base(cfg)
    ckpt = out / "checkpoints"
    trainer = RewardTrainer(model=model, args=reward_args(cfg, ckpt, bool(eval_rows)), processing_class=tok,
                            train_dataset=Dataset.from_list(trainer_rows(train_rows)),
                            eval_dataset=Dataset.from_list(trainer_rows(eval_rows)) if eval_rows else None,
                            peft_config=lora_config(cfg.recipe.reward.lora, "SEQ_CLS"))
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(ckpt))
    history = trainer.state.log_history  # restored from the checkpoint on resume, so complete
    atomic_write_json(out / "log_history.json", history)
    adapter = save_folder(out / "adapter", lambda tmp: (trainer.model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    plot_curves(history, {"loss": "train loss", "eval_loss": "validation loss"},
                "Reward model: pairwise loss", images_dir(cfg) / "reward_loss.png", "loss")
    return adapter


def load_reward_model(cfg, adapter_dir: str | Path, device=None):
    """(merged reward model in eval mode ON ``device``, its tokenizer) from a reward adapter folder.

    ``device``: None is :func:`~phyassist.recipes.common.scoring_device` (the GPU when there is one).
    The sequence-classification base loads on the CPU (``from_pretrained`` without a device map), so
    without this move every score would be computed there: the predict step's 1,371 answers took
    minutes on a GPU machine. On the CPU, 16-bit weights are cast to float32 (CPU kernels for bf16 are
    slow)."""
    import torch
    from peft import PeftModel

    from phyassist.recipes.common import adapter_problem, scoring_device

    adapter_dir = Path(adapter_dir)
    problem = adapter_problem(adapter_dir, "reward adapter")
    if problem:
        raise FileNotFoundError(f"{problem}: run the recipe's reward step, or set recipe.reward_adapter")
    model, tok = load_reward_base(cfg)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    device = torch.device(device) if device is not None else scoring_device(cfg)
    if device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16):
        model = model.float()
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def score(model, tok, conversations: list[list[dict]], batch_size: int = 8, max_length: int | None = None,
          desc: str = "reward scores", progress: bool = True) -> list[float]:
    """Reward of each full conversation (prompt + answer), rendered with the chat template: batches
    of ``batch_size`` of similar length (little padding) on the model's device, no autograd, a
    progress bar; results in input order. ``max_length``: longer conversations keep their LAST
    ``max_length`` tokens (the answer being scored; the reward trainer drops pairs over its max_length)."""
    import torch
    from tqdm.auto import tqdm

    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[float] = [0.0] * len(texts)
    device = model.device
    side = tok.truncation_side
    tok.truncation_side = "left"
    bar = tqdm(total=len(texts), desc=desc, unit="ex", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False,
                          truncation=max_length is not None, max_length=max_length)
                vals = model(**enc.to(device)).logits[:, 0].float().tolist()
                for i, v in zip(idx, vals):
                    out[i] = v
                bar.update(len(idx))
    finally:
        tok.truncation_side = side
        bar.close()
    return out
