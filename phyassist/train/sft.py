"""TRL wiring: the run's ``SFTConfig`` and the kit's ``SFTTrainer`` subclass (flat optimizer,
deferred metrics, a loss on a model split over GPUs, run metadata in every checkpoint)."""

from __future__ import annotations

from pathlib import Path

from phyassist.io import atomic_write_json
from phyassist.models.inference import ADAPTER_META
from phyassist.train.checks import TrainSetupError


TORCH_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adagrad", "rmsprop")


def sft_config(cfg, ckpt_dir: Path, has_eval: bool):
    """TRL's SFTConfig with the run's hyper-parameters (configs/paper.yaml: the study's)."""
    import torch
    from trl import SFTConfig

    from phyassist.models.placement import under_fsdp

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
        output_dir=str(ckpt_dir), seed=cfg.seed,
        data_seed=cfg.seed,  # the sampler's own seed: a resumed run sees the same data order
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        optim=optim, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a warmup_steps below 1 as a ratio (warmup_ratio is gone)
        max_grad_norm=t.max_grad_norm,
        save_steps=t.save_steps, logging_steps=t.logging_steps, save_total_limit=t.save_total_limit,
        logging_first_step=True,  # a loss at step 1, so a curve starts where training does
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",  # transformers 5's name
        gradient_checkpointing=t.gradient_checkpointing is True,  # "attention": ours, prepare_for_training
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing is True else None,
        bf16=t.bf16 and use_cuda, use_cpu=not use_cuda,  # bf16 autocast on GPUs only; CPU profiles train in fp32
        max_length=cfg.model.max_seq_length, completion_only_loss=t.completion_only_loss,
        router_aux_loss_coef=t.router_aux_loss_coef,
        # best-fit-decreasing packing with position ids restarting per example: no cross-example attention
        packing=t.packing, packing_strategy="bfd", padding_free=t.packing,
        eval_strategy="steps" if evaluating else "no", eval_steps=t.eval_steps,
        load_best_model_at_end=best, metric_for_best_model=t.metric_for_best_model if best else None,
        greater_is_better=t.greater_is_better if best else None,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        report_to=["wandb"] if cfg.wandb.mode != "disabled" else "none",
        run_name=cfg.wandb.run_name or cfg.name,
        include_num_input_tokens_seen="non_padding",  # tokens/s of real tokens (the meter and the logs)
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=True, disable_tqdm=False,  # records carry only input_ids/labels; progress bar on
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


def trainer_class():
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
        # idles while the host queues the next kernels (measured on Mixtral: bench/trainer_gpu.md). Here they stay on the device until the next log
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
                atomic_write_json(path / ADAPTER_META, self._phyassist_meta)

    return PhyAssistSFTTrainer
