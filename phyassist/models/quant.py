"""4-bit NF4 settings and sizes shared by the loaders and the memory projection: the torch dtype
of a config name, bitsandbytes' config, which parameters a QLoRA load stores in 4 bit, and their
bytes."""

from __future__ import annotations

import math

from phyassist.models.placement import under_fsdp


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def quant_storage(q) -> str:
    """The 4-bit storage dtype: FSDP can only shard (and all-gather) floating-point tensors, and it
    wants one dtype per wrapped block, so under FSDP the packed bytes are viewed as the compute dtype."""
    if q.storage != "auto":
        return q.storage
    return q.compute_dtype if under_fsdp() else "uint8"


def bnb_config(mcfg):
    from transformers import BitsAndBytesConfig

    q = mcfg.quant
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
                              bnb_4bit_quant_storage=torch_dtype(quant_storage(q)))


def stored_in_4bit(name: str, p, quant_experts: bool) -> bool:
    """Which parameters a QLoRA load stores in 4 bit: linear weights (not the LM head) and,
    with ``quantize_experts``, the fused 3-D expert tensors."""
    if p.dim() == 3:
        return quant_experts
    return p.dim() == 2 and name.endswith("proj.weight") or name.endswith(("fc1.weight", "fc2.weight"))


def four_bit_bytes(n: int, double_quant: bool, blocksize: int = 64) -> float:
    """Bytes of ``n`` values in 4 bit: half a byte each plus the block statistics (one fp32 absmax
    per block, or with double quantization one byte per block plus one fp32 per 256 blocks)."""
    blocks = math.ceil(n / blocksize)
    stats = blocks * 1 + math.ceil(blocks / 256) * 4 if double_quant else blocks * 4
    return n / 2 + stats
