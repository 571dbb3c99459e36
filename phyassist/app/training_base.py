"""The resident base for patient-adapter training: the loaded serving model's own weights, so a
training job neither reads the base model from disk nor holds a second copy of it.

Right after the app loads its model, before any adapter is added to it and before it generates,
:class:`TrainingBase` keeps a *pristine* copy of the model's module tree over the serving model's
weight tensors (``copy.deepcopy`` with those tensors in its memo: no weight is copied). Each job
gets a copy of that tree (:meth:`TrainingBase.fresh`, milliseconds) to attach its LoRA to, while
the serving model keeps generating, patient adapters switched in, in another thread.

Only tensor storage is shared. Modules, ``Parameter`` objects and bitsandbytes' 4-bit statistics
(``QuantState``) are objects of each copy's own, because the training path, and bitsandbytes,
change those objects in place. What happens to a model handed to the kit's trainer, and why none
of it reaches the serving model:

- module state (``.train()``, gradient-checkpointing flags, the attention-only checkpointing's
  patched ``forward``, PEFT's LoRA wrappers, input-grad hooks, ``config.use_cache``): the job's
  modules and config are its own;
- ``param.data = param.data.to(float32)`` (PEFT's k-bit preparation casts 16-bit norms, router,
  embeddings and head) and ``param.requires_grad = False``: act on the job's own ``Parameter``
  objects, so the cast gives the job a tensor of its own for just those parameters (freed with
  the job; about 1 GiB for Mixtral-8x7B's embeddings and head) and the shared ones stay as they are;
- bitsandbytes on a CPU repacks a 4-bit weight for its AVX512-BF16 kernel at the first eval-mode
  forward (``weight.data = packed``, the ``QuantState`` rewritten in place) and unpacks it again to
  save a state dict, as the trainer does: with objects of their own, the serving model and a job
  each change only theirs. (On such a CPU the serving model then holds the repacked weights and
  the resident base the original ones: the 4-bit weights twice. GPUs never repack.)
- 4-bit storage is never cast (integer data); optimizer steps update LoRA weights only: the base
  is frozen, and patient training trains no biases
  (:func:`phyassist.app.service.patient_training_config`): a bias step is an in-place update of
  the shared storage.

On a CPU with ``app.train_4bit_on_cpu: false`` the job's copy also gets full-precision linears
dequantized from the 4-bit ones (its own memory, for the job only): bitsandbytes' 4-bit training
path is slow on a CPU, and the adapter learns on the weights it will be served with.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANT_FLAGS = ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "quantization_method", "hf_quantizer")


def _is_quant_state(obj: Any) -> bool:
    """bitsandbytes' 4-bit statistics (absmax, code, nested state): weight memory, not config."""
    return type(obj).__name__ == "QuantState"


def _module_attributes(model: nn.Module):
    """(name, value) of what modules keep as plain attributes (not parameters, buffers, children)."""
    for mod_name, mod in model.named_modules():
        for key, value in vars(mod).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                yield f"{mod_name}.{key}" if mod_name else key, value


def weight_holders(model: nn.Module) -> dict[int, Any]:
    """Everything holding the model's weights, by id: parameters, buffers, and tensors or 4-bit
    statistics kept as attributes of modules (``Linear4bit.quant_state``, ``Packed4bit.quant_state``)
    or of parameters (``Params4bit.quant_state``)."""
    found: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    attrs = [v for _n, v in _module_attributes(model)] + [getattr(p, "quant_state", None) for p in model.parameters()]
    for value in attrs:
        if isinstance(value, torch.Tensor) or _is_quant_state(value):
            found[id(value)] = value
    return found


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight tensor by name, the ones inside 4-bit statistics included (for checks)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))

    def stats(name: str, state) -> None:
        for key, value in vars(state).items():
            if isinstance(value, torch.Tensor):
                out[f"{name}.{key}"] = value
            elif _is_quant_state(value):
                stats(f"{name}.{key}", value)

    for name, value in _module_attributes(model):
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif _is_quant_state(value):
            stats(name, value)
    for name, p in model.named_parameters(remove_duplicate=False):
        if _is_quant_state(getattr(p, "quant_state", None)):
            stats(f"{name}.quant_state", p.quant_state)
    return out


def unshared(copied: nn.Module, source: nn.Module) -> list[str]:
    """Names of ``copied``'s weight tensors whose memory is not ``source``'s (empty ones aside)."""
    def where(t: torch.Tensor) -> int | None:
        return None if t.is_meta or not t.numel() else t.untyped_storage().data_ptr()

    ptrs = {where(t) for t in weight_tensors(source).values()}
    return [n for n, t in weight_tensors(copied).items() if where(t) is not None and where(t) not in ptrs]


def _own(obj: Any, memo: dict[int, Any]) -> Any:
    """``obj``'s stand-in in a copy: a parameter object of its own over the same storage (its
    attributes, e.g. ``Params4bit.quant_state``, mapped to the copy's), a 4-bit statistics object
    of its own over the same tensors, or a plain tensor itself."""
    if isinstance(obj, nn.Parameter):
        own = torch.Tensor._make_subclass(type(obj), obj.detach(), False)
        own.__dict__.update({k: memo.get(id(v), v) for k, v in vars(obj).items()})
        return own
    return copy.copy(obj) if _is_quant_state(obj) else obj


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree over the same weight storage, with module, parameter and
    4-bit statistics objects of its own (see the module doc for why)."""
    holders = weight_holders(model)
    memo: dict[int, Any] = {}
    for key, obj in sorted(holders.items(), key=lambda kv: isinstance(kv[1], nn.Parameter)):
        memo[key] = _own(obj, memo)  # statistics first: parameters point to the copy's
    copied = copy.deepcopy(model, memo)
    for p in copied.parameters():  # Params4bit.module: the copy's layer, not the source's
        if isinstance(getattr(p, "module", None), nn.Module):
            p.module = memo.get(id(p.module), p.module)
    return copied


def is_4bit(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is stored in bitsandbytes 4 bit."""
    return (any(type(p).__name__ == "Params4bit" for p in model.parameters())
            or any(_is_quant_state(v) for _n, v in _module_attributes(model)))


def dequantize_linears(model: nn.Module) -> int:
    """Replace bitsandbytes 4-bit linears by full-precision ones holding the dequantized weights
    (new tensors of ``model``'s own). Returns how many; a model left without 4-bit weights loses
    its quantized marks, so the trainer treats it as the plain model it now is."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return 0
    done = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        weight = dequantize_4bit(mod.weight.data, mod.weight.quant_state).reshape(mod.out_features, mod.in_features)
        weight = weight.to(getattr(mod, "compute_dtype", None) or weight.dtype)  # what the 4-bit layer computes in
        linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if mod.bias is not None:
            linear.bias = mod.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        done += 1
    if done and not is_4bit(model):
        for flag in QUANT_FLAGS:
            model.__dict__.pop(flag, None)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    return done


class TrainingBase:
    """The serving model's pristine module tree, kept to give each training job a base to train
    on. Make it right after loading: adapters added to the model later are the serving model's,
    never a job's."""

    def __init__(self, model: nn.Module):
        t0 = time.perf_counter()
        if any(getattr(v, "packing_format_for_cpu", False) for v in weight_holders(model).values()):
            raise RuntimeError("training base: bitsandbytes has repacked the model's 4-bit weights for CPU "
                               "inference (it does at the first generation); take the base before that")
        self.pristine = sharing_copy(model)
        bad = unshared(self.pristine, model)
        if bad:
            raise RuntimeError(f"training base: {len(bad)} weight tensor(s) would be a second copy in memory "
                               f"(e.g. {bad[0]}); the resident base shares every weight with the serving model")
        self.snapshot_s = time.perf_counter() - t0
        log.info("resident training base ready in %.3f s (weights shared with the serving model)", self.snapshot_s)

    def fresh(self, full_precision: bool = False) -> nn.Module:
        """A base for one job: the pristine tree copied again, over the same weights.
        ``full_precision``: its 4-bit linears dequantized (CPU training)."""
        model = sharing_copy(self.pristine)
        if full_precision:
            n = dequantize_linears(model)
            if n:
                log.info("training base: %d 4-bit linear(s) dequantized for full-precision training", n)
        return model
