"""Config sections ``train`` (LoRA + SFT hyper-parameters) and ``wandb``."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from phyassist.schema_base import Section

# optimizers whose update treats every element alone: train.flat_optimizer gives them the same result
ELEMENTWISE = ("paged_adamw_32bit", "adamw_torch", "adamw_torch_fused", "sgd")


class LoraConfig(Section):
    r: int = Field(32, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    target_router: bool = Field(False, description="Also adapt the MoE router `gate` (no dropout there).")
    router_parameters: list[str] = Field(
        default_factory=lambda: ["mlp.gate.weight"],
        description="Router weights adapted through PEFT's target_parameters when target_router is on.")
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: str = "paged_adamw_32bit"
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_grad_norm: float = Field(0.3, gt=0)
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: Optional[int] = Field(None, gt=0, description="None: the train batch size.")
    gradient_accumulation_steps: int = Field(4, gt=0)
    max_steps: int = Field(660, description="-1 trains for num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0)
    save_steps: int = Field(20, gt=0)
    logging_steps: int = Field(20, gt=0)
    save_total_limit: Optional[int] = Field(3, gt=0)
    group_by_length: bool = True
    gradient_checkpointing: Union[bool, Literal["attention"]] = Field(
        True, description="true: whole decoder layers; 'attention': only the attention half, the 4-bit "
        "experts recompute just their gate/up GEMM (model.quant.experts_method=grouped; faster at the "
        "same memory, bench/finetune_mixtral.md); false: none.")
    compile_attention: bool = Field(
        False, description="With gradient_checkpointing 'attention' or false: torch.compile each layer's attention "
        "half (one graph for all layers; compiling makes the first steps slower, by how much: "
        "bench/trainer_gpu.md) so its norms, rotary, LoRA dropout, casts and residual adds run fused "
        "(bench/finetune_mixtral.md).")
    attention_memory_budget: Optional[float] = Field(
        None, ge=0, le=1, description="With compile_attention: instead of checkpointing the attention half, let "
        "the compiler's partitioner choose what to recompute within this fraction of its activation memory "
        "(0: about what checkpointing keeps; 1: everything). None: checkpoint it.")
    flat_optimizer: bool = Field(
        False, description="Update all LoRA tensors in one optimizer call (views of one flat buffer) instead of "
        f"one call and kernel each: the same elementwise update; optim must be one of {', '.join(ELEMENTWISE)} "
        "(bench/finetune_mixtral.md).")
    router_aux_loss_coef: Optional[float] = Field(
        0.0, ge=0, description="Weight of the MoE load-balancing loss. 0: off, the objective the study trained "
        "(Mixtral's config returns no router logits, so the TRL and transformers of early 2024 added none); "
        "None: TRL 1.16's default, the architecture's own coefficient (0.02 for Mixtral), which TRL adds on the "
        "first GPU's device and so fails on a model split over GPUs (found on two H200s).")
    completion_only_loss: bool = True
    packing: bool = Field(False, description="Padding-free packing (no cross-example attention).")
    bf16: bool = True
    resume: bool = Field(True, description="Continue from the last checkpoint in the output folder.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate on val.jsonl every N steps (None: never).")
    load_best_model_at_end: bool = Field(
        False, description="With eval_steps: the checkpoint with the best metric_for_best_model is never "
        "rotated out by save_total_limit, and training ends with its weights, so <out>/adapter is the best "
        "adapter (save_steps must be a multiple of eval_steps).")
    metric_for_best_model: str = Field("eval_loss", description="Logged evaluation metric that picks the best "
                                       "checkpoint (load_best_model_at_end).")
    greater_is_better: Optional[bool] = Field(None, description="None: lower is better for a metric ending "
                                              "in 'loss', higher otherwise.")
    max_eval_records: int = Field(200, gt=0, description="Cap on validation records (evaluation costs time).")
    dataloader_num_workers: int = Field(0, ge=0)
    check_memory: bool = Field(True, description="Refuse to start when the projection exceeds GPU memory.")

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.compile_attention and self.gradient_checkpointing is True:
            raise ValueError("train.compile_attention needs train.gradient_checkpointing: attention or false "
                             "(got true: whole layers are checkpointed by transformers, uncompiled)")
        if self.flat_optimizer and self.optim not in ELEMENTWISE:
            raise ValueError(f"train.flat_optimizer needs an elementwise train.optim ({', '.join(ELEMENTWISE)}); "
                             f"got {self.optim!r}")
        if self.attention_memory_budget is not None and not self.compile_attention:
            raise ValueError("train.attention_memory_budget needs train.compile_attention: true")
        return self


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "phyassist"
    run_name: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    entity: Optional[str] = None
    log_system: bool = Field(True, description="Log tokens/s, GPU memory and power with the training metrics.")
