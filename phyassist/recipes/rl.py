"""RL on the SFT model with the reward model: TRL's RLOOTrainer and a FRESH LoRA adapter.

Why RLOO: TRL 1.16 has no PPOTrainer. RLOO (REINFORCE leave-one-out) is TRL's maintained
on-policy method that, like the PPO the case study ran, subtracts a KL penalty to the reference
from the reward itself (``reward - beta * KL``, summed per completion) and needs no value
model; GRPO instead adds KL as a loss term. The reward model is passed as a reward function.

Why a fresh adapter: the SFT adapter is merged into the weights first, so the trainer's
reference (the same model with adapters disabled) IS the SFT model and the KL keeps the policy
near it; only the new RL adapter learns (the case study's ``resume_lora_training False``).
Because LoRA updates add up on the same linear layers, base + SFT adapter + RL adapter stacked
at inference equals the merged SFT model + RL adapter that was trained (see :mod:`.adapters`).
"""

from __future__ import annotations

from pathlib import Path

from phyassist.io import atomic_write_json, last_complete_checkpoint
from phyassist.recipes.common import (images_dir, lora_config, save_folder, step_dir,
                                      trainer_common)
from phyassist.recipes.dialogues import prompt_messages, seeded_cap


def rl_prompts(records: list[dict], max_prompt_chars: int | None, cap: int | None, seed: int) -> list[dict]:
    """Conversational prompts (history + patient turn), long ones dropped, seeded cap."""
    rows = [{"prompt": prompt_messages(r)} for r in records]
    if max_prompt_chars:
        rows = [r for r in rows if sum(len(m["content"]) for m in r["prompt"]) <= max_prompt_chars]
    if not rows:
        raise ValueError(f"no RL prompt within recipe.rl.max_prompt_chars={max_prompt_chars}")
    return seeded_cap(rows, cap, seed)


def load_sft_merged(cfg, sft_adapter: str | Path):
    """(base with the SFT adapter merged in, left-padded tokenizer): the policy's starting point and
    the KL reference."""
    from phyassist.models.inference import load_for_inference

    model, tok = load_for_inference(cfg, [sft_adapter])
    return model.merge_and_unload(), tok


def rloo_args(cfg, output_dir: Path):
    from trl import RLOOConfig

    r = cfg.recipe.rl
    block = r.steps_per_generation or r.gradient_accumulation_steps  # completions generated at once, per device
    if (r.per_device_train_batch_size * block) % r.num_generations:
        raise ValueError(f"recipe.rl: per_device_train_batch_size × (steps_per_generation or "
                         f"gradient_accumulation_steps) ({r.per_device_train_batch_size}×{block}) must be a "
                         f"multiple of num_generations ({r.num_generations})")
    return RLOOConfig(
        learning_rate=r.learning_rate, beta=r.beta, num_generations=r.num_generations,
        per_device_train_batch_size=r.per_device_train_batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps, steps_per_generation=r.steps_per_generation,
        max_steps=r.max_steps,
        max_completion_length=r.max_completion_length, temperature=r.temperature,
        logging_steps=r.logging_steps, logging_first_step=True, save_steps=r.save_steps,
        gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False}, **trainer_common(cfg, output_dir))


def train_rl(cfg, records: list[dict], sft_adapter: str | Path, reward_adapter: str | Path) -> Path:
    """Train the RL adapter; resumes from ``<out>/rl/checkpoints``. Returns the adapter folder."""
    from datasets import Dataset
    from trl import RLOOTrainer

    from phyassist.recipes.plots import plot_curves
    from phyassist.recipes.reward import load_reward_model

    r, out = cfg.recipe.rl, step_dir(cfg, "rl")
    policy, tok = load_sft_merged(cfg, sft_adapter)
    reward_model, reward_tok = load_reward_model(cfg, reward_adapter)
    prompts = Dataset.from_list(rl_prompts(records, r.max_prompt_chars, r.max_prompts, cfg.seed))
    ckpt = out / "checkpoints"
    trainer = RLOOTrainer(model=policy, reward_funcs=reward_model, args=rloo_args(cfg, ckpt), train_dataset=prompts,
                          processing_class=tok, reward_processing_classes=reward_tok,
                          peft_config=lora_config(r.lora, "CAUSAL_LM"))
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(ckpt))
    history = trainer.state.log_history  # restored from the checkpoint on resume, so complete
    atomic_write_json(out / "log_history.json", history)
    adapter = save_folder(out / "adapter", lambda tmp: (trainer.model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    img = images_dir(cfg)
    plot_curves(history, {"reward": "reward-model score (before the KL penalty)"},
                "RL: mean reward per step", img / "rl_reward.png", "reward")
    plot_curves(history, {"kl": "KL(policy || SFT reference), per token"},
                "RL: KL to the SFT model", img / "rl_kl.png", "KL")
    plot_curves(history, {"completions/mean_length": "mean completion length",
                          "completions/mean_terminated_length": "mean length of completions that ended"},
                "RL: response length per generation round", img / "rl_length.png", "tokens")
    return adapter
