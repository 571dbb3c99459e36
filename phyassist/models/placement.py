"""Where a model's pieces go: one device, or contiguous blocks of decoder layers over the GPUs.

Shared by the loaders (:mod:`phyassist.models.loading`, :mod:`phyassist.models.mixtral4bit.loader`)
and the training stage's memory projection (:mod:`phyassist.train.dryrun`), so that the dry run
plans the same split the load makes.
"""

from __future__ import annotations

import os

GIB = 2**30


def parse_gib(text: str | None) -> float | None:
    """'24GiB' / '24GB' / '24000MiB' -> GiB."""
    if not text:
        return None
    s = text.strip().upper().replace(" ", "")
    units = {"GIB": 1.0, "GB": 1e9 / GIB, "MIB": 1 / 1024, "MB": 1e6 / GIB, "TIB": 1024.0}
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def under_fsdp() -> bool:
    """Started by ``accelerate launch`` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def max_memory(mcfg) -> dict | None:
    """Per-GPU cap from the config (the study's profile: two 24 GB cards)."""
    import torch

    if not torch.cuda.is_available() or not mcfg.max_memory_per_gpu:
        return None
    n = mcfg.num_gpus or torch.cuda.device_count()
    return {i: mcfg.max_memory_per_gpu for i in range(n)}


def device_map(mcfg):
    """``device_map`` for ``from_pretrained``: ``{"": device}`` for one device, None under FSDP,
    else accelerate's ``auto``/``balanced`` placement."""
    import torch

    if under_fsdp():  # FSDP places (and shards) the weights itself after the load
        return None
    if mcfg.device_map == "cpu" or not torch.cuda.is_available():
        return {"": "cpu"}
    if mcfg.device_map == "single":  # under `accelerate launch` each process takes its own GPU
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return mcfg.device_map  # "auto" / "balanced": accelerate places layers under max_memory


def balance_layers(n_layers: int, fixed: list[float]) -> list[int]:
    """Decoder layers per GPU: the same number on every GPU, the remainder to the GPUs with the least
    ``fixed`` memory (embeddings on the first, head on the last).

    A layer split is a pipeline: every GPU takes its share of the layers. Minimising the largest
    GPU's memory instead would put every layer of a small model beside the embeddings and leave the
    last GPU only the head and logits; and accelerate's ``balanced`` placement, which loads the dense
    models, also spreads the layers."""
    n = len(fixed)
    counts = [n_layers // n] * n
    for i in sorted(range(n), key=lambda j: (fixed[j], j))[:n_layers % n]:
        counts[i] += 1
    return counts


def layer_device_map(config, counts: list[int], devices: list | None = None) -> dict:
    """An explicit ``device_map``: contiguous blocks of decoder layers per GPU, embeddings on
    the first GPU, final norm and LM head on the last."""
    devices = devices if devices is not None else list(range(len(counts)))
    if sum(counts) != config.num_hidden_layers:
        raise ValueError(f"layer counts {counts} do not add up to {config.num_hidden_layers} layers")
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    layer = 0
    for dev, c in zip(devices, counts):
        for _ in range(c):
            dmap[f"model.layers.{layer}"] = dev
            layer += 1
    dmap["model.norm"] = devices[-1]
    dmap["lm_head"] = devices[-1]
    return dmap
