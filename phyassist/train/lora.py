"""The study's LoRA (r=32, alpha=32, dropout 0.05 on q/k/v/o) plus the MoE router.

PEFT adapts the router (``MixtralTopKRouter``, a bare ``weight`` parameter, not an
``nn.Linear``) through ``target_parameters``, whose ``ParamWrapper`` refuses any
``lora_dropout != 0``. So the adapter is built with dropout 0 and the linear targets then get
their ``nn.Dropout(p)`` back: the study's dropout wherever PEFT can apply it, none on the router
(8 outputs; 131,328 of the 31,465,472 parameters). The saved ``adapter_config.json`` says
``lora_dropout: 0``, which changes nothing at inference (dropout is off in eval mode).
"""

from __future__ import annotations

from torch import nn


def router_parameter_names(model, suffixes: list[str]) -> list[str]:
    """The router parameter suffixes that exist in ``model`` (none for dense models)."""
    names = [n for n, _ in model.named_parameters()]
    return [s for s in suffixes if any(n.endswith(s) for n in names)]


def lora_config(lcfg, model):
    from peft import LoraConfig

    routers = router_parameter_names(model, lcfg.router_parameters) if lcfg.target_router else []
    return LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=0.0 if routers else lcfg.dropout,
                      target_modules=list(lcfg.target_modules), target_parameters=routers or None,
                      bias=lcfg.bias, task_type="CAUSAL_LM")


def restore_linear_dropout(model, p: float, adapter: str = "default") -> int:
    """Give every LoRA linear layer (plain or 4-bit) its dropout ``p`` (ParamWrappers keep none)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    n = 0
    for mod in model.modules():
        if (isinstance(mod, LoraLayer) and not isinstance(mod, ParamWrapper)
                and adapter in mod.lora_dropout and p > 0):
            mod.lora_dropout[adapter] = nn.Dropout(p)
            n += 1
    return n


def apply_lora(model, lcfg):
    """Wrap ``model`` with the configured LoRA adapter; returns the PeftModel."""
    from peft import get_peft_model

    cfg = lora_config(lcfg, model)
    peft_model = get_peft_model(model, cfg)
    if cfg.target_parameters and lcfg.dropout > 0:
        restore_linear_dropout(peft_model, lcfg.dropout)
    return peft_model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
