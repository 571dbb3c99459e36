"""Load a tokenizer and model as a config's ``model`` section says: registry key, Hub id or
local path; full precision or 4-bit NF4; one device or layers spread over the GPUs present."""

from __future__ import annotations

import os

from phyassist.models.chat_templates import ensure_chat_template
from phyassist.models.placement import device_map, max_memory, under_fsdp
from phyassist.models.quant import bnb_config, torch_dtype
from phyassist.models.registry import get_spec, resolve_model_path
from phyassist.models.schema import ModelConfig


def _offline(mcfg: ModelConfig) -> bool:
    return mcfg.local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1"


def load_tokenizer(mcfg: ModelConfig, padding_side: str = "right"):
    """Tokenizer with a chat template and a pad token (for batching)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(mcfg.name)
    tok = AutoTokenizer.from_pretrained(path, revision=mcfg.revision, local_files_only=_offline(mcfg))
    spec = get_spec(mcfg.name)
    ensure_chat_template(tok, mcfg.chat_template, spec.chat_template if spec else None)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = padding_side
    return tok


def _is_moe(mcfg: ModelConfig, path: str) -> bool:
    """Fused-expert architectures are built layer by layer into 4 bit
    (:mod:`phyassist.models.mixtral4bit.loader`): bitsandbytes' load would bring their experts in 16 bit."""
    from transformers import AutoConfig

    from phyassist.models.mixtral4bit.loader import has_fused_experts

    config = AutoConfig.from_pretrained(path, revision=mcfg.revision, local_files_only=_offline(mcfg))
    return has_fused_experts(config)


def load_model(mcfg: ModelConfig, *, for_training: bool = False):
    """The causal LM, quantized per ``mcfg.quant``. MoE models in 4 bit are read layer by layer
    straight into 4 bit, experts included (:mod:`phyassist.models.mixtral4bit.loader`); others go
    through bitsandbytes' load, then :func:`~phyassist.models.mixtral4bit.experts.quantize_moe_experts`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(mcfg.name)
    if mcfg.quant.load_in_4bit and mcfg.quant.quantize_experts and _is_moe(mcfg, path):
        from phyassist.models.mixtral4bit.loader import load_quantized_moe

        if under_fsdp():
            raise ValueError(
                f"model {mcfg.name}: FSDP QLoRA is not supported for MoE models with fused experts. The kit's "
                "4-bit experts are packed buffers that FSDP neither shards nor all-gathers. Split the layers "
                "over the GPUs instead (model.device_map=balanced, as the study), or use data parallel "
                "(configs/accelerate/ddp.yaml) where one GPU holds the whole 4-bit model.")
        model = load_quantized_moe(mcfg, path)
        if for_training:
            model.config.use_cache = False
        return model
    kwargs = dict(revision=mcfg.revision, local_files_only=_offline(mcfg), dtype=torch_dtype(mcfg.dtype),
                  device_map=device_map(mcfg), max_memory=max_memory(mcfg))
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    if mcfg.quant.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(mcfg)
        kwargs["dtype"] = torch_dtype(mcfg.quant.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if mcfg.quant.load_in_4bit and mcfg.quant.quantize_experts:
        from phyassist.models.mixtral4bit.experts import quantize_moe_experts

        quantize_moe_experts(model, mcfg.quant, method=mcfg.quant.experts_method)
    if for_training:
        model.config.use_cache = False
    return model
