"""Gradient checkpointing of the attention half of each decoder layer only.

Whole-layer checkpointing (transformers' default) reruns every layer's forward in the backward
pass: for Mixtral that is the two expert GEMMs again, a third of the step's FLOPs. The 4-bit
expert block (:class:`phyassist.models.quantize.Quant4bitExperts` with
``keep_activations=False``) already keeps only its input and recomputes just the gate/up GEMM
it needs, so only the attention half needs checkpointing: per layer the residual stream and the
MoE input stay alive (2 x tokens x hidden), and the down projection is never rerun.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _layer_forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                   past_key_values=None, **kwargs):
    def attention_half(x):
        h, _ = self.self_attn(hidden_states=self.input_layernorm(x), position_embeddings=position_embeddings,
                              attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, **kwargs)
        h = x + h
        return h, self.post_attention_layernorm(h)

    if self.training and torch.is_grad_enabled():
        h, normed = checkpoint(attention_half, hidden_states, use_reentrant=False)
    else:
        h, normed = attention_half(hidden_states)
    return h + self.mlp(normed)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Pre-norm decoder layers (attention then MLP, each with a residual), as Llama/Mixtral/Qwen."""
    return [m for m in model.modules() if all(hasattr(m, p) for p in LAYER_PARTS)]


def resolve_mode(mode, model: nn.Module):
    """``"attention"`` pays off only with the kit's 4-bit experts (they recompute for themselves);
    any other model gets whole-layer checkpointing (``True``) instead."""
    from phyassist.models.quantize import Quant4bitExperts

    if mode == "attention" and not any(isinstance(m, Quant4bitExperts) for m in model.modules()):
        return True
    return mode


def checkpoint_attention_only(model: nn.Module, keep_expert_activations: bool = False) -> int:
    """Checkpoint each decoder layer's attention half; returns how many layers were patched.

    Also turns off the experts' saved gate/up activations (they recompute them instead), which
    is what keeps the memory at whole-layer checkpointing's level.
    """
    from phyassist.models.quantize import Quant4bitExperts

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no pre-norm decoder layers "
                         f"(with {', '.join(LAYER_PARTS)}) to checkpoint")
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False  # ours replaces the whole-layer one
        layer.forward = types.MethodType(_layer_forward, layer)
    for m in model.modules():
        if isinstance(m, Quant4bitExperts):
            m.keep_activations = keep_expert_activations
    return len(layers)
