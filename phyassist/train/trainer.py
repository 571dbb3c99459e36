"""QLoRA supervised fine-tuning with TRL's SFTTrainer, as the study ran it.

``train(cfg)`` reads ``<out>/data/train.jsonl`` (written by the data stage), tokenizes each record
with the loss on the answer only, loads the base model in 4-bit NF4 (experts included, see
:mod:`phyassist.models.quantize`), attaches the study's LoRA and trains; a killed run continues
from its last checkpoint with the same data order. ``load_for_inference`` gives the model back
with the adapter attached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from phyassist.io import atomic_write_json, read_jsonl
from phyassist.train.lora import apply_lora

IGNORE = -100
RUN_META = "phyassist_train.json"  # written into each checkpoint: which base model it belongs to


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/``torchrun`` (the one that writes run files), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


class TrainSetupError(ValueError):
    """A training run that cannot start as configured; the message says what to change."""


# ---------------------------------------------------------------- data

def data_file(cfg, split: str = "train") -> Path:
    return cfg.out / "data" / f"{split}.jsonl"


def read_records(cfg, split: str = "train", required: bool = True) -> list[dict] | None:
    """Records written by the data stage; a missing train file is an error naming the file."""
    path = data_file(cfg, split)
    if not path.exists():
        if required:
            raise FileNotFoundError(
                f"{path}: training data not found; run `python -m phyassist data --config <profile> "
                f"--output-dir {cfg.out}` first (or pass train_records=)")
        return None
    rows = read_jsonl(path)
    if required and not rows:
        raise ValueError(f"{path}: no records")
    return rows


def _segments(tokenizer, record: dict, index: int) -> list[tuple[str, bool]]:
    """The record as (text, in_loss) pieces: prompt/completion, or a multi-turn ``messages`` list
    rendered with the chat template and split at each assistant turn."""
    if "messages" in record and record["messages"]:
        msgs = record["messages"]
        pieces, done = [], ""
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError(f"record {index}: chat template does not render turns as prefixes")
            pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        if not pieces:
            raise ValueError(f"record {index}: messages contain no assistant turn")
        return pieces
    if "prompt" in record and "completion" in record:
        return [(record["prompt"], False), (record["completion"], True)]
    raise ValueError(f"record {index}: needs `prompt` and `completion`, or `messages` "
                     f"(got keys {sorted(record)})")


def tokenize_record(tokenizer, record: dict, max_length: int, completion_only: bool = True,
                    index: int = 0) -> dict:
    """``input_ids`` and ``labels`` (-100 outside the answer when ``completion_only``).

    Templates render special tokens into the text, so none are added here; an EOS ends the
    sequence so the model learns to stop.
    """
    ids, labels = [], []
    for text, in_loss in _segments(tokenizer, record, index):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (in_loss or not completion_only) else [IGNORE] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_dataset(tokenizer, records: Iterable[dict], max_length: int, completion_only: bool = True):
    """A tokenized ``datasets.Dataset``; records whose answer is cut off entirely are dropped."""
    from datasets import Dataset

    rows = [tokenize_record(tokenizer, r, max_length, completion_only, i) for i, r in enumerate(records)]
    rows = [r for r in rows if any(t != IGNORE for t in r["labels"])]
    if not rows:
        raise ValueError(f"no record has answer tokens within max_seq_length={max_length}")
    return Dataset.from_list(rows)


# ---------------------------------------------------------------- checks

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


def model_identity(cfg) -> str:
    return cfg.model.name if cfg.model.revision is None else f"{cfg.model.name}@{cfg.model.revision}"


def last_checkpoint(ckpt_dir: Path, cfg) -> str | None:
    """The newest checkpoint to resume from, refusing one made for another base model."""
    from phyassist.io import last_complete_checkpoint

    if not cfg.train.resume:
        return None
    last = last_complete_checkpoint(ckpt_dir)
    if last is None:
        return None
    meta = Path(last) / RUN_META
    if meta.exists():
        base = json.loads(meta.read_text(encoding="utf-8")).get("base_model")
        if base != model_identity(cfg):
            raise TrainSetupError(
                f"{last}: checkpoint was trained on base model {base!r}, this run uses "
                f"{model_identity(cfg)!r}. Use another --output-dir, or set train.resume=false "
                f"to start over (the old checkpoints are then replaced).")
    return last


# ---------------------------------------------------------------- trainer

TORCH_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adagrad", "rmsprop")


def sft_config(cfg, ckpt_dir: Path, has_eval: bool):
    """TRL's SFTConfig with the run's hyper-parameters (configs/paper.yaml: the study's)."""
    import torch
    from trl import SFTConfig

    from phyassist.models.loading import under_fsdp

    t = cfg.train
    use_cuda = torch.cuda.is_available() and cfg.model.device_map != "cpu"
    optim = t.optim
    if under_fsdp() and optim not in TORCH_OPTIMS:
        # bitsandbytes' optimizers (paged_adamw_32bit, ...) cannot step FSDP2's DTensor weights
        # (measured: "got mixed torch.Tensor and DTensor"); FSDP already shards the optimizer state
        print(f"[train] train.optim={optim!r} cannot update FSDP-sharded weights; using adamw_torch", flush=True)
        optim = "adamw_torch"
    evaluating = bool(has_eval and t.eval_steps)
    best = evaluating and t.load_best_model_at_end  # without evaluation there is no best to keep
    if best and t.save_steps % t.eval_steps:
        raise TrainSetupError(f"train.load_best_model_at_end needs train.save_steps ({t.save_steps}) to be a "
                              f"multiple of train.eval_steps ({t.eval_steps}): only evaluated checkpoints can be best")
    return SFTConfig(
        output_dir=str(ckpt_dir), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        optim=optim, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        save_steps=t.save_steps, logging_steps=t.logging_steps, save_total_limit=t.save_total_limit,
        logging_first_step=True,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        gradient_checkpointing=t.gradient_checkpointing is True,  # "attention": ours, prepare_for_training
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing is True else None,
        bf16=t.bf16 and use_cuda, use_cpu=not use_cuda,
        max_length=cfg.model.max_seq_length, completion_only_loss=t.completion_only_loss,
        router_aux_loss_coef=t.router_aux_loss_coef,
        packing=t.packing, packing_strategy="bfd", padding_free=t.packing,
        eval_strategy="steps" if evaluating else "no", eval_steps=t.eval_steps,
        load_best_model_at_end=best, metric_for_best_model=t.metric_for_best_model if best else None,
        greater_is_better=t.greater_is_better if best else None,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        report_to=["wandb"] if cfg.wandb.mode != "disabled" else "none",
        run_name=cfg.wandb.run_name or cfg.name,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=True, disable_tqdm=False,
        # data parallel: every LoRA weight gets a gradient each step, and the frozen 4-bit buffers are
        # identical on every rank (each loads the same file), so neither is searched for nor re-sent per step
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False,
    )


def split_head_device(model, device):
    """The LM head's device when the model is split over several devices (``hf_device_map``, the
    study's layer split) and the head is not on ``device`` (where the Trainer counts tokens and
    sums losses); else None."""
    dmap = getattr(model, "hf_device_map", None) or {}
    if len({str(d) for d in dmap.values()}) < 2:
        return None
    head = model.get_output_embeddings().weight.device
    return head if str(head) != str(device) else None


def _trainer_class():
    import functools

    from trl import SFTTrainer

    class PhyAssistSFTTrainer(SFTTrainer):
        """SFTTrainer whose log lines also carry the system meter's numbers (tokens/s, GPU)."""

        meter = None
        flat_optimizer = False  # train.flat_optimizer

        def create_optimizer(self, model=None):
            """The stock optimizer, or the same class and arguments over flat parameters (the stock
            one is built first for its parameter groups; bitsandbytes allocates state at the first step)."""
            fresh = self.optimizer is None
            opt = super().create_optimizer(model)
            if fresh and self.flat_optimizer:
                from phyassist.train.flat_optim import flat_optimizer

                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
                self.optimizer = flat_optimizer(cls, opt.param_groups, **kwargs)
            return self.optimizer

        @functools.cached_property
        def _split_head(self):
            """The model's placement is fixed once training starts: looked up once, not per micro-batch."""
            return split_head_device(self.model, self.args.device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """TRL's fused loss comes out on the LM head's device; on a model split over GPUs the
            Trainer's token count lives on the first one, and so does its running loss: the count
            goes to the head and the loss comes back (TRL 1.16 divides across devices and fails)."""
            import torch

            head = self._split_head
            if head is not None and torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(head)
            if self._deferrable(return_outputs):
                result = self._fused_loss_deferred(model, inputs, num_items_in_batch)
            else:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if head is None:
                return result
            if return_outputs:
                return result[0].to(self.args.device), result[1]
            return result.to(self.args.device)

        # Deferred metrics. TRL 1.16 reads its per-micro-batch metrics (entropy, token accuracy,
        # token count, aux loss) back to the host as soon as the forward ends, and the Trainer its
        # input-token count before each forward: each read waits for the GPU to drain, which then
        # idles while the host queues the next kernels (165 ms of idle GPU in a 2.17 s optimizer
        # step on Mixtral, bench/trainer_gpu.md). Here they stay on the device until the next log
        # or checkpoint, and are read there in one transfer; the logged values are TRL's.
        defer_metrics = True
        _pending = None  # {name: [0-d device tensor per micro-batch]} until the next flush

        def _deferrable(self, return_outputs) -> bool:
            """Training through TRL's default fused-head loss, the path whose metrics can wait."""
            pc = getattr(self.accelerator, "parallelism_config", None)
            return (self.defer_metrics and self.model.training and not return_outputs
                    and self.compute_loss_func is None and self.label_smoother is None
                    and self.args.loss_type == "nll" and not getattr(pc, "sp_enabled", False))

        def _fused_loss_deferred(self, model, inputs, num_items_in_batch):
            """TRL's fused-head loss (``SFTTrainer.compute_loss``, loss type nll), its metrics kept
            on the device; ``test_deferred_metrics_log_what_trl_logs`` holds the two equal."""
            import torch

            inputs["use_cache"] = False
            if self.aux_loss_enabled:
                inputs["output_router_logits"] = True
            outputs = model(**inputs, fused_lm_head=True)
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            gather = self.accelerator.gather_for_metrics
            if self.aux_loss_enabled:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
                self._defer("aux_loss", gather(outputs.aux_loss.detach()).mean())
            self._defer("valid", gather(outputs.label_mask.sum()).sum())
            self._defer("entropy", gather(outputs.entropy.detach().sum()).sum())
            self._defer("correct", gather(outputs.is_top1.sum()).sum())
            if "attention_mask" in inputs:
                self._defer("train_tokens", gather(inputs["attention_mask"].sum()).sum())
            else:  # padding-free: one packed row (filled on the device: a copy from the host would wait)
                ids = inputs["position_ids"]
                self._defer("train_tokens", gather(ids.new_full((), ids.size(1))).sum())
            return loss

        def _track_num_input_tokens(self, inputs):
            if self.defer_metrics and self.args.include_num_input_tokens_seen == "non_padding" \
                    and "attention_mask" in inputs:
                self._defer("input_tokens", self.accelerator.gather(inputs["attention_mask"].sum()).sum())
            else:
                super()._track_num_input_tokens(inputs)

        def _defer(self, key, value):
            if self._pending is None:
                self._pending = {}
            self._pending.setdefault(key, []).append(value.detach())

        def _flush_metrics(self):
            """Read the deferred values (one transfer) into TRL's metrics and the Trainer's state."""
            import torch

            pending, self._pending = self._pending, None
            if not pending:
                return
            keys = list(pending)
            flat = torch.cat([torch.stack([v.to(self.args.device, torch.float64) for v in pending[k]])
                              for k in keys]).tolist()
            got, i = {}, 0
            for k in keys:
                got[k], i = flat[i:i + len(pending[k])], i + len(pending[k])
            metrics = self._metrics["train"]
            if "valid" in got:
                for name, num in (("entropy", "entropy"), ("mean_token_accuracy", "correct")):
                    metrics[name].extend(n / v if v > 0 else 0.0 for n, v in zip(got[num], got["valid"]))
            if "aux_loss" in got:
                metrics["aux_loss"].extend(got["aux_loss"])
            for n in got.get("train_tokens", ()):
                self._total_train_tokens += int(n) // self._tp_size
            if "train_tokens" in got:
                metrics["num_tokens"] = [self._total_train_tokens]
            self.state.num_input_tokens_seen += int(sum(got.get("input_tokens", ())))

        def log(self, logs, start_time=None):
            self._flush_metrics()
            if self.meter is not None and "loss" in logs:
                logs = {**logs, **self.meter.sample(self.state)}
            return super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            self._flush_metrics()  # the saved state counts every token seen
            super()._save_checkpoint(model, trial)
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            path = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if self.args.should_save and path.is_dir():  # one writer under accelerate launch
                atomic_write_json(path / RUN_META, self._phyassist_meta)

    return PhyAssistSFTTrainer


def _load(cfg, model, tokenizer):
    from phyassist.models.loading import load_model, load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg.model, padding_side="right")
    if model is None:
        model = load_model(cfg.model, for_training=True)
    return model, tokenizer


def _effective_checkpointing(cfg, model):
    from phyassist.models.loading import under_fsdp
    from phyassist.train.checkpointing import resolve_mode

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
        from phyassist.train.checkpointing import checkpoint_attention_only

        # without checkpointing (ckpt false) the experts keep their gate/up activations too
        checkpoint_attention_only(model, keep_expert_activations=ckpt is False, compile=t.compile_attention,
                                  checkpoint_attention=ckpt == "attention", memory_budget=t.attention_memory_budget)
    if cfg.model.quant.keep_dequantized_layers:
        from phyassist.models.quantize import keep_dequantized_weights

        keep_dequantized_weights(model, cfg.model.quant.keep_dequantized_layers)
    return model


def train(cfg, train_records=None, eval_records=None, output_dir=None, model=None, tokenizer=None,
          callbacks=None) -> Path:
    """Fine-tune; returns the adapter folder (``<out>/adapter`` by default, PEFT format)."""
    from phyassist.models.loading import under_fsdp
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
    trainer = _trainer_class()(model=model, args=sft_config(cfg, ckpt_dir, eval_ds is not None),
                               train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                               callbacks=[layout_callback(out), card_callback(cfg.model.name), progress_callback(),
                                          *(callbacks or [])])
    trainer.meter = meter
    trainer.flat_optimizer = cfg.train.flat_optimizer and not under_fsdp()  # FSDP shards the weights itself
    trainer._phyassist_meta = {"base_model": model_identity(cfg), "lora": cfg.train.lora.model_dump()}
    trainer.train(resume_from_checkpoint=resume)
    save_adapter(trainer, tokenizer, adapter_dir, cfg)
    if trainer.args.should_save:
        state = ckpt_dir / "trainer_state.json"
        trainer.state.save_to_json(str(state))
        write_run_summary(cfg, out, state, plot_training(state, out / "images"))
    _finish_wandb()
    return adapter_dir


def save_adapter(trainer, tokenizer, adapter_dir: Path, cfg) -> Path:
    """Write the final adapter atomically: into a temp folder, then renamed over the old one.
    Under ``accelerate launch`` every process takes part (FSDP gathers the sharded LoRA weights)
    and only the main one writes."""
    import shutil

    from phyassist.train.callbacks import name_base_model

    acc, main = trainer.accelerator, trainer.args.should_save
    if trainer.is_fsdp_enabled:  # one full adapter file, not a folder of shards
        acc.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    trainer.save_model(str(tmp))  # PEFT model: the adapter only (and the tokenizer)
    if not main:
        acc.wait_for_everyone()
        return adapter_dir
    (tmp / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(tmp))
    name_base_model(tmp, cfg.model.name)  # PEFT's card names the local cache folder, not the base model
    st = trainer.state
    atomic_write_json(tmp / RUN_META, {"base_model": model_identity(cfg), "lora": cfg.train.lora.model_dump(),
                                       "global_step": st.global_step,
                                       "best_checkpoint": st.best_model_checkpoint and Path(st.best_model_checkpoint).name,
                                       "best_metric": st.best_metric,
                                       "weights": "best" if trainer.args.load_best_model_at_end else "final"})
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    acc.wait_for_everyone()
    return adapter_dir


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def load_for_inference(cfg, adapter_dir=None):
    """(model, tokenizer) for generation: base model as configured, adapter attached if given,
    tokenizer left-padded for batched generation."""
    from phyassist.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    model = load_model(cfg.model, for_training=False)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
        meta = adapter_dir / RUN_META
        if meta.exists():
            base = json.loads(meta.read_text(encoding="utf-8")).get("base_model")
            if base and base != model_identity(cfg):
                raise TrainSetupError(f"{adapter_dir}: adapter was trained on {base!r}, not {model_identity(cfg)!r}")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    model.config.use_cache = True
    return model, tokenizer
