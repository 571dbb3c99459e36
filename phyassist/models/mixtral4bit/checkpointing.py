"""Gradient checkpointing of the attention half of each decoder layer only.

Whole-layer checkpointing (transformers' default) reruns every layer's forward in the backward
pass: for Mixtral that is the two expert GEMMs again, a third of the step's FLOPs. The 4-bit
expert block (:class:`phyassist.models.mixtral4bit.experts.Quant4bitExperts` with
``keep_activations=False``) already keeps only its input and recomputes just the gate/up GEMM
it needs, so only the attention half needs checkpointing: per layer the residual stream and the
MoE input stay alive (2 x tokens x hidden), and the down projection is never rerun.

The interface between the two halves is explicit: the experts declare the dtype they compute in
(``Quant4bitExperts.compute_dtype``), the attention half rounds the MLP's input to it
(``attention_half(..., mlp_input_dtype=)``), and each patched layer carries its settings in one
:class:`AttentionOnly` record.

``compile=True`` (``train.compile_attention``) runs that attention half, in training, as one
``torch.compile`` graph shared by all layers (speed and memory: bench/finetune_mixtral.md).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from phyassist.models.mixtral4bit.experts import Quant4bitExperts

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class AttentionOnly:
    """How one patched decoder layer runs its attention half (``layer.attention_only``)."""

    checkpoint: bool = True  # recompute the attention half in the backward
    compile: bool = False  # through compiled_attention_half (training only)
    memory_budget: float | None = None  # the compiler's activation memory budget (with compile)
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    mlp_input_dtype: torch.dtype | None = None  # the 4-bit experts' compute dtype, None for other MLPs


def mlp_input_dtype(layer: nn.Module) -> torch.dtype | None:
    """The compute dtype of the kit's 4-bit experts in ``layer.mlp`` (None: another MLP)."""
    experts = [m for m in layer.mlp.modules() if isinstance(m, Quant4bitExperts)]
    return experts[0].compute_dtype if experts else None


def attention_half(layer, x, position_embeddings=None, attention_mask=None, position_ids=None,
                   past_key_values=None, call_hooks=True, mlp_input_dtype=None, **kwargs):
    """Norm, attention and residual, plus the MLP's input norm: everything of a layer but the MLP.
    ``call_hooks=False`` runs the attention's ``forward`` without its module hooks;
    ``mlp_input_dtype`` (see :func:`mlp_input_dtype`) rounds the MLP's input to the experts' dtype."""
    attn = layer.self_attn if call_hooks else layer.self_attn.forward
    h, _ = attn(hidden_states=layer.input_layernorm(x), position_embeddings=position_embeddings,
                attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values, **kwargs)
    h = x + h
    normed = layer.post_attention_layernorm(h)
    if mlp_input_dtype is not None and torch.is_autocast_enabled(normed.device.type) \
            and torch.get_autocast_dtype(normed.device.type) == mlp_input_dtype:
        # QLoRA's prep keeps norms (and so the residual stream) in fp32, but the router runs under
        # autocast and the 4-bit experts in their compute dtype: both round this input to it
        # anyway. Rounding once here stores one 16-bit copy per layer instead of an fp32 tensor
        # plus the experts' 16-bit copy (the peak it saves: bench/trainer_gpu.md).
        normed = normed.to(mlp_input_dtype)
    return h, normed


_compiled: dict = {}  # {(memory_budget, mode): the compiled attention half}, one entry at a time


def compiled_attention_half(memory_budget: float | None = None, mode: str | None = None):
    """One ``torch.compile`` of :func:`attention_half` shared by all layers.

    The layer is an argument and its parameters graph inputs (dynamo's default of inlining
    built-in modules), so 32 identical layers compile once; inductor fuses the norms, rotary,
    LoRA dropout and scaling, casts and residual adds that eager mode runs as separate kernels.
    ``memory_budget`` (0-1, without checkpointing) lets the compiler's partitioner choose what to
    recompute: 0 keeps about what checkpointing keeps, 1 everything. Dynamo caches graphs per
    function, not per budget, so asking for another budget starts compilation afresh. ``mode``:
    torch.compile's (None: its default).
    """
    key = (memory_budget, mode)
    if key not in _compiled:
        if _compiled:
            torch._dynamo.reset()
            _compiled.clear()
        fn = torch.compile(attention_half, mode=mode)
        if memory_budget is not None:
            def fn(*args, _fn=fn, **kwargs):
                with torch._functorch.config.patch(activation_memory_budget=memory_budget):
                    return _fn(*args, **kwargs)
        _compiled[key] = fn
    return _compiled[key]


def only_output_capturing_hooks(module: nn.Module) -> bool:
    """Whether ``module``'s hooks are at most transformers' output-capturing forward hook.

    transformers installs that hook on every attention module the first time any output
    (hidden states, router logits, attention maps) is asked of the model, as TRL's trainer does.
    Its ``ContextVar`` lookup cannot be traced, so each compiled attention half fell into three
    graphs with eager code between them (found through the trainer on an H100,
    bench/trainer_gpu.md). It records attention maps only when they are asked for, which
    training never does, so the compiled path may skip it; any other hook is kept.
    """
    if module._forward_pre_hooks or getattr(module, "_backward_hooks", None):
        return False
    return all(getattr(h, "__name__", "") == "output_capturing_hook" for h in module._forward_hooks.values())


def _layer_forward(self, hidden_states, **kwargs):
    how: AttentionOnly = self.attention_only
    training = self.training and torch.is_grad_enabled()
    # compiled for training only: evaluation and generation (a KV cache growing by one token a
    # step) run eagerly
    compiled = how.compile and training
    fn = compiled_attention_half(how.memory_budget, how.compile_mode) if compiled else attention_half
    if compiled and self.self_attn._forward_hooks and only_output_capturing_hooks(self.self_attn):
        kwargs["call_hooks"] = False
    kwargs["mlp_input_dtype"] = how.mlp_input_dtype
    if how.checkpoint and training:
        h, normed = checkpoint(fn, self, hidden_states, use_reentrant=False, **kwargs)
    else:
        h, normed = fn(self, hidden_states, **kwargs)
    return h + self.mlp(normed)


def patch_forward(module: nn.Module, fn) -> None:
    """Make ``fn`` the module's forward, behind any accelerate hook: a model split over GPUs
    (``dispatch_model``, the study's layer split) moves each layer's inputs to its device in the
    hook that wraps ``forward``; replacing ``forward`` itself would drop that move (found on two
    H200s: the first layer of the second GPU got its input on the first)."""
    method = types.MethodType(fn, module)
    if getattr(module, "_hf_hook", None) is not None and hasattr(module, "_old_forward"):
        module._old_forward = method
    else:
        module.forward = method


def drop_inner_device_hooks(layer: nn.Module) -> int:
    """Remove accelerate's device hooks from the modules inside ``layer`` when the layer has its own.

    ``dispatch_model`` (a model split over GPUs) hooks each device-map entry, here the layer, to move
    its inputs to its GPU, and also every submodule with parameters; inside a layer that lives on
    one GPU those inner moves do nothing, and dynamo cannot trace them (the compiled attention half
    failed on the CPU, and hit its recompile limit on two H200s). The layer's own hook stays.
    Returns how many hooks were removed."""
    if getattr(layer, "_hf_hook", None) is None:
        return 0  # no hook of its own: the map may split inside the layer, so keep the inner ones
    from accelerate.hooks import remove_hook_from_module

    inner = [m for m in layer.modules() if m is not layer and getattr(m, "_hf_hook", None) is not None]
    for m in inner:
        remove_hook_from_module(m)
    return len(inner)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Pre-norm decoder layers (attention then MLP, each with a residual), as Llama/Mixtral/Qwen."""
    return [m for m in model.modules() if all(hasattr(m, p) for p in LAYER_PARTS)]


def resolve_mode(mode, model: nn.Module):
    """``"attention"`` pays off only with the kit's 4-bit experts (they recompute for themselves);
    any other model gets whole-layer checkpointing (``True``) instead."""
    if mode == "attention" and not any(isinstance(m, Quant4bitExperts) for m in model.modules()):
        return True
    return mode


def checkpoint_attention_only(model: nn.Module, keep_expert_activations: bool = False, compile: bool = False,
                              checkpoint_attention: bool = True, memory_budget: float | None = None,
                              compile_mode: str | None = None) -> int:
    """Checkpoint each decoder layer's attention half; returns how many layers were patched.

    Also turns off the experts' saved gate/up activations (they recompute them instead), which
    is what keeps the memory at whole-layer checkpointing's level. ``compile`` runs the attention
    half through :func:`compiled_attention_half`; ``checkpoint_attention=False`` keeps its
    activations instead of recomputing them (more memory, less time). ``compile_mode``:
    torch.compile's mode for the attention half (None: its default).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no pre-norm decoder layers "
                         f"(with {', '.join(LAYER_PARTS)}) to checkpoint")
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False  # ours replaces the whole-layer one
        layer.attention_only = AttentionOnly(
            checkpoint=checkpoint_attention and memory_budget is None, compile=compile, memory_budget=memory_budget,
            compile_mode=compile_mode, mlp_input_dtype=mlp_input_dtype(layer))
        patch_forward(layer, _layer_forward)
        if compile:
            drop_inner_device_hooks(layer)
    for m in model.modules():
        if isinstance(m, Quant4bitExperts):
            m.keep_activations = keep_expert_activations
    return len(layers)
