"""Build a Mixture-of-Experts causal LM from its safetensors checkpoint straight into 4 bit.

``from_pretrained(..., quantization_config=bnb)`` brings transformers 5.x's fused 3-D expert
tensors onto the GPUs in bf16 (bitsandbytes quantizes only ``nn.Linear``): Mixtral-8x7B's 87 GiB
do not fit two 24 GB cards before :func:`~phyassist.models.mixtral4bit.experts.quantize_moe_experts` runs.
Here the model is a meta-device skeleton; each decoder layer in turn is materialized on its
target device from the checkpoint, its linear layers and fused experts are quantized, and its
16-bit copies are freed before the next layer exists. A device therefore never holds more than
its finished 4-bit layers plus one layer in 16 bit.

Checkpoint layouts read (both seen in the wild for Mixtral):

* original, per expert: ``model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight``
  (the Hub checkpoint, and what ``save_pretrained`` writes by default);
* fused: ``model.layers.N.mlp.experts.gate_up_proj|down_proj``
  (``save_pretrained(..., save_original_format=False)``).

The per-expert to fused mapping is transformers' own (``conversion_mapping`` "mixtral"):
``.block_sparse_moe.`` -> ``.mlp.``, ``gate_up_proj[e] = cat(w1[e], w3[e])``, ``down_proj[e] = w2[e]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from phyassist.models.mixtral4bit.build import quantize_linears
from phyassist.models.mixtral4bit.experts import iter_fused_experts, quantize_moe_experts
from phyassist.models.placement import GIB, balance_layers, device_map, layer_device_map, parse_gib
from phyassist.models.quant import bnb_config, four_bit_bytes, stored_in_4bit, torch_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# fused parameter name -> per-expert weight names, concatenated along the output rows
EXPERT_PARTS = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
# name in the fused (transformers 5) model -> name in the original checkpoint
LEGACY_RENAMES = ((".mlp.", ".block_sparse_moe."),)


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor the model needs, or holds it with the wrong shape."""


def checkpoint_folder(name_or_path: str, revision: str | None = None, local_files_only: bool = False) -> Path:
    """A local folder as is; a Hub id is downloaded (weights, configs, tokenizer only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision, local_files_only=local_files_only,
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


class Checkpoint:
    """Which file holds which tensor (from the index json, or the single file's header);
    tensors are read one at a time through safetensors' memory map."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.exists():
            self.source = index
            data = json.loads(index.read_text())
            if not isinstance(data.get("weight_map"), dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self.weight_map = dict(data["weight_map"])
        elif single.exists():
            from safetensors import safe_open

            self.source = single
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def first_present(self, keys: list[str]) -> str | None:
        return next((k for k in keys if k in self), None)

    def get(self, key: str) -> torch.Tensor:
        """The tensor on the CPU (a memory-mapped read), or an error naming key and file."""
        from safetensors import safe_open

        if key not in self.weight_map:
            raise CheckpointError(f"tensor {key!r} missing from checkpoint {self.source}")
        file = self.folder / self.weight_map[key]
        if not file.exists():
            raise CheckpointError(f"{file}: file listed for tensor {key!r} in {self.source} does not exist")
        with safe_open(file, framework="pt") as f:
            if key not in f.keys():
                raise CheckpointError(f"tensor {key!r} missing from {file} (listed there by {self.source})")
            return f.get_tensor(key)

    def where(self, key: str) -> Path:
        return self.folder / self.weight_map.get(key, self.source.name)


def key_candidates(name: str) -> list[str]:
    """A parameter's checkpoint key: its own name first, then its original (pre-fusion) name."""
    out = [name]
    for new, old in LEGACY_RENAMES:
        if new in name:
            out.append(name.replace(new, old))
    return out


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, key: str, ckpt: Checkpoint) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {key!r} in {ckpt.where(key)} has shape {tuple(src.shape)}, "
                              f"the model expects {tuple(dst.shape)}")
    dst.copy_(src)


def _fill_per_expert(param: torch.Tensor, name: str, ckpt: Checkpoint) -> None:
    """Fused ``[E, rows, cols]`` from per-expert matrices stacked row-wise (gate before up)."""
    stem, _, fused = name.rpartition(".")
    parts = EXPERT_PARTS[fused]
    rows = param.shape[1] // len(parts)
    for e in range(param.shape[0]):
        for j, part in enumerate(parts):
            wanted = key_candidates(f"{stem}.{e}.{part}.weight")
            key = ckpt.first_present(wanted)
            if key is None:
                raise CheckpointError(f"expert tensor {wanted[-1]!r} (or fused {name!r}) missing from "
                                      f"checkpoint {ckpt.source}")
            _copy_checked(param[e, j * rows:(j + 1) * rows], ckpt.get(key), key, ckpt)


def fill_tensor(param: torch.Tensor, name: str, ckpt: Checkpoint) -> None:
    """Copy the checkpoint's tensor for ``name`` into ``param`` (converting dtype and device)."""
    key = ckpt.first_present(key_candidates(name))
    if key is not None:
        _copy_checked(param, ckpt.get(key), key, ckpt)
    elif param.dim() == 3 and name.rpartition(".")[2] in EXPERT_PARTS:
        _fill_per_expert(param, name, ckpt)
    else:
        raise CheckpointError(f"tensor {name!r} missing from checkpoint {ckpt.source}")


def materialize_(module: nn.Module, prefix: str, ckpt: Checkpoint, device, dtype: torch.dtype) -> None:
    """Allocate ``module`` (a meta-device skeleton) on ``device`` and fill it from the checkpoint."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
            fill_tensor(p.data, prefix + name, ckpt)
        for mod_name, mod in module.named_modules():
            for bname, buf in mod.named_buffers(recurse=False):
                full = ".".join(x for x in (mod_name, bname) if x)
                if bname in mod._non_persistent_buffers_set:
                    raise CheckpointError(f"{prefix}{full}: computed buffer the 4-bit loader cannot rebuild")
                fill_tensor(buf, prefix + full, ckpt)


def quantized_layer_bytes(layer: nn.Module, quant_cfg, dtype_bytes: int = 2) -> float:
    """A decoder layer's size once quantized (4-bit matrices plus statistics, rest in 16 bit)."""
    total = 0.0
    for name, p in layer.named_parameters():
        if stored_in_4bit(name, p, quant_cfg.quantize_experts) and not name.endswith("gate.weight"):
            total += four_bit_bytes(p.numel(), quant_cfg.double_quant)
        else:
            total += p.numel() * dtype_bytes
    return total


def plan_device_map(mcfg, model, quant_cfg) -> dict[str, object]:
    """Module name -> device. One device for ``device_map: cpu|single`` or without CUDA; else the
    decoder layers in contiguous, equal blocks over the GPUs (:func:`~phyassist.models.placement.balance_layers`),
    each GPU's 4-bit layers plus one layer in 16 bit (the transient while it is quantized) within
    ``max_memory_per_gpu``."""
    config = model.config
    dmap = device_map(mcfg)
    if isinstance(dmap, dict):
        return {"": dmap[""]}
    n_gpu = mcfg.num_gpus or torch.cuda.device_count()
    layer = model.model.layers[0]
    per_layer = quantized_layer_bytes(layer, quant_cfg) / GIB
    bf16_layer = sum(p.numel() for p in layer.parameters()) * 2 / GIB
    embed = model.model.embed_tokens.weight.numel() * 2 / GIB
    head = model.lm_head.weight.numel() * 2 / GIB
    fixed = [bf16_layer + (embed if i == 0 else 0.0) + (head if i == n_gpu - 1 else 0.0) for i in range(n_gpu)]
    counts = balance_layers(config.num_hidden_layers, fixed)
    cap = parse_gib(mcfg.max_memory_per_gpu)
    for i, c in enumerate(counts):
        need = fixed[i] + c * per_layer
        limit = cap or torch.cuda.get_device_properties(i).total_memory / GIB
        if need > limit:
            raise CheckpointError(f"GPU {i}: {c} layers in 4 bit need {need:.1f} GiB during the load, "
                                  f"more than its {limit:.1f} GiB (model.max_memory_per_gpu / num_gpus)")
    return layer_device_map(config, counts)


def _device_of(dmap: dict, name: str):
    if "" in dmap:
        return dmap[""]
    return dmap[name]


def mark_quantized(model: nn.Module, mcfg) -> None:
    """What ``from_pretrained`` attaches to a bitsandbytes 4-bit load, so that PEFT's k-bit
    preparation and the Trainer's quantized-training checks treat this model the same way."""
    from transformers.quantizers.auto import AutoHfQuantizer

    qcfg = bnb_config(mcfg)
    model.config.quantization_config = qcfg
    model.hf_quantizer = AutoHfQuantizer.from_config(qcfg, pre_quantized=False)
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"


def load_quantized_moe(mcfg, path: str, method: str | None = None, progress: bool = True) -> nn.Module:
    """The causal LM of ``path`` (folder or Hub id) built layer by layer into 4 bit per ``mcfg``."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = checkpoint_folder(path, mcfg.revision, mcfg.local_files_only)
    ckpt = Checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = torch_dtype(mcfg.quant.compute_dtype)
    kwargs = {"attn_implementation": mcfg.attn_implementation} if mcfg.attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    dmap = plan_device_map(mcfg, model, mcfg.quant)
    base = model.model
    with torch.device(_device_of(dmap, "model.rotary_emb")):
        base.rotary_emb = type(base.rotary_emb)(config=config)
    materialize_(base.embed_tokens, "model.embed_tokens.", ckpt, _device_of(dmap, "model.embed_tokens"), dtype)
    for i in tqdm(range(config.num_hidden_layers), desc="4-bit layers", disable=not progress):
        device = torch.device(_device_of(dmap, f"model.layers.{i}"))
        layer = base.layers[i]
        materialize_(layer, f"model.layers.{i}.", ckpt, device, dtype)
        quantize_linears(layer, mcfg.quant)
        quantize_moe_experts(layer, mcfg.quant, method=method or mcfg.quant.experts_method)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the freed 16-bit copies go back before the next layer
    materialize_(base.norm, "model.norm.", ckpt, _device_of(dmap, "model.norm"), dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = base.embed_tokens.weight
    else:
        materialize_(model.lm_head, "lm_head.", ckpt, _device_of(dmap, "lm_head"), dtype)
    mark_quantized(model, mcfg)
    if "" not in dmap:
        from accelerate import dispatch_model

        model.hf_device_map = dmap
        dispatch_model(model, device_map=dmap)
    return model.eval()


def has_fused_experts(config) -> bool:
    """Whether the architecture stores experts as fused 3-D tensors (checked on a meta build)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return any(True for _ in iter_fused_experts(model))
