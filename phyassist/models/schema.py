"""Config section ``model``: which base model, how it is loaded and quantized, where it runs."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from phyassist.schema_base import Section


class QuantConfig(Section):
    """bitsandbytes 4-bit settings (QLoRA)."""

    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantize_experts: bool = Field(
        True, description="Also quantize fused 3-D MoE expert tensors (bitsandbytes skips them).")
    experts_method: Literal["parametrize", "grouped"] = Field(
        "parametrize", description="How 4-bit experts run: bitsandbytes' parametrization under "
        "transformers' experts code, or the kit's grouped-GEMM module with fused SwiGLU "
        "(phyassist.models.mixtral4bit; measured in bench/finetune_mixtral.md).")
    expert_gemm: Literal["grouped", "per_expert"] = Field(
        "grouped", description="GEMMs of the grouped experts on GPUs: torch's grouped GEMM (no host "
        "wait) or one cuBLAS GEMM per expert (faster on a router's uneven row counts, but the host "
        "waits for them once a layer; configs/single-gpu.yaml). Measured in bench/finetune_mixtral.md.")
    keep_dequantized_layers: int = Field(
        0, ge=0, description="Expert blocks (the last N layers) whose dequantized bf16 weights the "
        "forward saves for the backward instead of dequantizing them again: 2.6 GiB more per "
        "Mixtral-8x7B layer, for the time bench/finetune_mixtral.md measures (experts_method: grouped; "
        "configs/single-gpu.yaml).")
    storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the packed 4-bit bytes are stored as (bitsandbytes' quant_storage). "
        "FSDP shards only floating-point tensors, so 'auto' is uint8, or compute_dtype under "
        "`accelerate launch` with FSDP (configs/accelerate/fsdp_qlora.yaml).")

    @model_validator(mode="after")
    def _kept_weights_need_grouped(self):
        if self.keep_dequantized_layers and self.experts_method != "grouped":
            raise ValueError(f"keep_dequantized_layers={self.keep_dequantized_layers} needs experts_method: grouped "
                             f"(the kit's 4-bit experts), got {self.experts_method!r}")
        return self


class ModelConfig(Section):
    name: str = Field("smollm2-135m-instruct",
                      description="Registry key (see `python -m phyassist models`), Hub id or local path.")
    revision: Optional[str] = None
    chat_template: Literal["auto", "tokenizer", "mixtral", "chatml", "llama3"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_seq_length: int = Field(1024, gt=0)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    device_map: Literal["auto", "balanced", "cpu", "single"] = "auto"
    num_gpus: Optional[int] = Field(None, ge=1, description="GPUs to use (default: all present).")
    max_memory_per_gpu: Optional[str] = Field(None, description="Per-GPU cap, e.g. '24GiB'.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = "sdpa"
    local_files_only: bool = Field(False, description="Never touch the network (HF_HUB_OFFLINE also does).")
