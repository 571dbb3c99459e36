"""Building a model straight into 4 bit, one decoder layer at a time.

A full-width Mixtral-8x7B is 87 GiB in bf16: it fits no single GPU before quantization, so it is
built on the meta device and materialized one decoder layer at a time, each layer quantized
before the next one exists. :func:`build_quantized_model` fills the layers with random weights
(the benchmarks' model); :func:`phyassist.models.mixtral4bit.loader.load_quantized_moe` does the
same from a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from phyassist.models.mixtral4bit.experts import quantize_moe_experts, set_submodule
from phyassist.models.quant import torch_dtype


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight in NF4 on the same device."""
    import bitsandbytes as bnb

    dev = linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant,
                          quant_type=quant_type, device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                 quant_type=quant_type, compress_statistics=double_quant).to(dev)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return q


def quantize_linears(module: nn.Module, quant_cfg, skip: tuple[str, ...] = ("lm_head", "gate")) -> int:
    """Replace every ``nn.Linear`` under ``module`` (except ``skip``) by its 4-bit version."""
    n = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and not any(s == name.rsplit(".", 1)[-1] for s in skip):
            set_submodule(module, name, quantize_linear(child, quant_cfg.quant_type, quant_cfg.double_quant,
                                                        torch_dtype(quant_cfg.compute_dtype)))
            n += 1
    return n


def random_init_(module: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill a materialized module like ``from_config`` does: normal(0, std) matrices, unit norms."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)


def build_quantized_model(config, quant_cfg, device: torch.device | str, method: str = "parametrize",
                          layers: range | None = None, with_embed: bool = True, with_head: bool = True,
                          init_layer=random_init_, dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                          expert_options: dict | None = None):
    """A causal LM whose decoder layers (all, or ``layers``) live on ``device`` in 4 bit.

    Modules left out (other layers, embeddings, head) stay on the meta device: that is how one
    GPU's share of a layer-split model is simulated. ``expert_options`` go to
    :class:`~phyassist.models.mixtral4bit.experts.Quant4bitExperts` (method ``grouped``).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base = model.model
    with torch.device(device):
        base.rotary_emb = type(base.rotary_emb)(config=config)
    small = [base.norm] + ([base.embed_tokens] if with_embed else []) + ([model.lm_head] if with_head else [])
    for i, mod in enumerate(small):
        mod.to_empty(device=device)
        random_init_(mod, seed=10_000 + i)
    layers = layers if layers is not None else range(config.num_hidden_layers)
    for i in tqdm(layers, desc="4-bit layers", disable=not progress):
        layer = base.layers[i]
        layer.to_empty(device=device)
        init_layer(layer, seed=i)
        quantize_linears(layer, quant_cfg)
        quantize_moe_experts(layer, quant_cfg, method=method, **(expert_options or {}))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model
