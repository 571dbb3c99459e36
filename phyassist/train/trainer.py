"""QLoRA supervised fine-tuning with TRL's SFTTrainer, as the study ran it.

``train(cfg)`` reads ``<out>/data/train.jsonl`` (written by the data stage), tokenizes each record
with the loss on the answer only (:mod:`~phyassist.train.records`), loads the base model in 4-bit
NF4 (experts included, :mod:`phyassist.models.mixtral4bit`), attaches the study's LoRA and trains
through TRL (:mod:`~phyassist.train.sft`); a killed run continues from its last checkpoint with
the same data order (:mod:`~phyassist.train.checks`), and the adapter is written atomically
(:mod:`~phyassist.train.saving`). :func:`phyassist.models.inference.load_for_inference` loads it back.
"""

from __future__ import annotations

import os
from pathlib import Path

from phyassist.models.inference import model_identity
from phyassist.models.placement import under_fsdp
from phyassist.train.checks import check_hardware, last_checkpoint
from phyassist.train.lora import apply_lora
from phyassist.train.records import build_dataset, read_records
from phyassist.train.saving import save_adapter
from phyassist.train.sft import sft_config, trainer_class


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/``torchrun`` (the one that writes run files), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def _load(cfg, model, tokenizer):
    from phyassist.models.loading import load_model, load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg.model, padding_side="right")
    if model is None:
        model = load_model(cfg.model, for_training=True)
    return model, tokenizer


def _effective_checkpointing(cfg, model):
    from phyassist.models.mixtral4bit.checkpointing import resolve_mode

    mode = resolve_mode(cfg.train.gradient_checkpointing, model)
    if mode and under_fsdp() and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        # the FSDP config checkpoints each wrapped layer itself; a second checkpoint inside would
        # recompute twice (and the Trainer refuses both together)
        print("[train] FSDP config checkpoints activations (fsdp_activation_checkpointing); "
              "train.gradient_checkpointing is left to it", flush=True)
        mode = False
    elif mode != cfg.train.gradient_checkpointing:
        print(f"[train] gradient_checkpointing={cfg.train.gradient_checkpointing!r} needs the kit's 4-bit experts "
              f"(model.quant.experts_method=grouped on an MoE model); using whole-layer checkpointing", flush=True)
    if mode == cfg.train.gradient_checkpointing:
        return cfg
    update = {"gradient_checkpointing": mode}
    if cfg.train.compile_attention:
        print("[train] train.compile_attention works with attention-only checkpointing or none; not compiling",
              flush=True)
        update.update(compile_attention=False, attention_memory_budget=None)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def prepare_for_training(model, cfg):
    """Cast norms to fp32 and enable input gradients for checkpointing (PEFT's k-bit prep),
    then attach the LoRA adapter."""
    from peft import prepare_model_for_kbit_training

    ckpt = cfg.train.gradient_checkpointing
    if cfg.model.quant.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt is True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = apply_lora(model, cfg.train.lora)
    t = cfg.train
    if ckpt == "attention" or t.compile_attention:
        from phyassist.models.mixtral4bit.checkpointing import checkpoint_attention_only

        # without checkpointing (ckpt false) the experts keep their gate/up activations too
        checkpoint_attention_only(model, keep_expert_activations=ckpt is False, compile=t.compile_attention,
                                  checkpoint_attention=ckpt == "attention", memory_budget=t.attention_memory_budget)
    if cfg.model.quant.keep_dequantized_layers:
        from phyassist.models.mixtral4bit.experts import keep_dequantized_weights

        keep_dequantized_weights(model, cfg.model.quant.keep_dequantized_layers)
    return model


def train(cfg, train_records=None, eval_records=None, output_dir=None, model=None, tokenizer=None,
          callbacks=None) -> Path:
    """Fine-tune; returns the adapter folder (``<out>/adapter`` by default, PEFT format)."""
    from phyassist.runinfo import write_run_summary
    from phyassist.train.callbacks import (SystemMeter, card_callback, init_wandb, layout_callback,
                                           progress_callback)
    from phyassist.train.plots import plot_training

    out = Path(output_dir) if output_dir else cfg.out
    if output_dir:
        cfg = cfg.model_copy(update={"output_dir": str(out)})
    if train_records is None:
        from phyassist.data.records import check_run_records

        check_run_records(cfg)  # records formatted for another model's chat template are refused
    records = train_records if train_records is not None else read_records(cfg, "train")
    if eval_records is None and cfg.train.eval_steps:
        eval_records = read_records(cfg, "val", required=False)
    if model is None:
        check_hardware(cfg)
    from transformers import set_seed

    set_seed(cfg.seed)  # before LoRA's random init, so that a run repeats (the Trainer seeds only after it)
    ckpt_dir, adapter_dir = out / "checkpoints", out / "adapter"
    resume = last_checkpoint(ckpt_dir, cfg)

    model, tokenizer = _load(cfg, model, tokenizer)
    cfg = _effective_checkpointing(cfg, model)
    max_len = cfg.model.max_seq_length
    train_ds = build_dataset(tokenizer, records, max_len, cfg.train.completion_only_loss)
    eval_ds = None
    if eval_records:
        eval_ds = build_dataset(tokenizer, eval_records[:cfg.train.max_eval_records], max_len,
                                cfg.train.completion_only_loss)
    model = prepare_for_training(model, cfg)

    if is_main_process():
        init_wandb(cfg, out)
    meter = SystemMeter(enabled=cfg.wandb.log_system)
    trainer = trainer_class()(model=model, args=sft_config(cfg, ckpt_dir, eval_ds is not None),
                              train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                              callbacks=[layout_callback(out), card_callback(cfg.model.name), progress_callback(),
                                         *(callbacks or [])])
    trainer.meter = meter
    trainer.flat_optimizer = cfg.train.flat_optimizer and not under_fsdp()  # FSDP shards the weights itself
    trainer._phyassist_meta = {"base_model": model_identity(cfg.model), "lora": cfg.train.lora.model_dump()}
    trainer.train(resume_from_checkpoint=resume)
    save_adapter(trainer, tokenizer, adapter_dir, cfg)
    if trainer.args.should_save:
        state = ckpt_dir / "trainer_state.json"
        trainer.state.save_to_json(str(state))
        write_run_summary(cfg, out, state, plot_training(state, out / "images"))
    _finish_wandb()
    return adapter_dir


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
