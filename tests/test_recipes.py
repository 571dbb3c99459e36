"""Recipes without training: configs, dialogue conversion, counts, preferences, plots, and the
LoRA arithmetic that makes stacked SFT + RL adapters equal the model RL was trained on."""

import json
from pathlib import Path

import pytest

from phyassist.config import CONFIG_DIR, load_config, validate
from phyassist.recipes import dialogues as dlg
from phyassist.recipes.data import prepare
from phyassist.recipes.preference import load_preferences, to_pair

RECIPE_CONFIGS = sorted((CONFIG_DIR / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.stem)
def test_recipe_configs_validate(path):
    cfg = load_config(path)
    assert cfg.recipe.kind in ("soulchat", "covid")


def test_recipe_settings_are_the_studies():
    a = load_config("recipes/soulchat-llama3.2")
    assert (a.train.lora.r, a.train.lora.alpha, a.train.lora.target_modules) == (8, 32, ["q_proj", "v_proj"])
    assert (a.train.learning_rate, a.train.lr_scheduler_type, a.train.num_train_epochs) == (2e-5, "cosine", 3)
    assert a.train.per_device_train_batch_size == 2 and a.train.gradient_checkpointing and a.train.bf16
    b = load_config("recipes/covid-sft")
    assert (b.train.learning_rate, b.train.per_device_train_batch_size, b.train.gradient_accumulation_steps) == \
        (5e-5, 4, 8)
    assert (b.train.num_train_epochs, b.train.eval_steps, b.train.save_steps, b.recipe.data.val_fraction) == \
        (10, 100, 100, 0.05)
    assert b.recipe.steps == ["data", "sft"] and b.out == load_config("recipes/covid-rl").out
    assert (b.recipe.reward.learning_rate, b.recipe.reward.num_train_epochs) == (1e-5, 1)


def test_unknown_recipe_key_is_named():
    from phyassist.config import ConfigError

    with pytest.raises(ConfigError, match="recipe.rl.betta"):
        load_config("recipes/covid-smoke", {"recipe.rl.betta": 0.1})


def test_prefixed_dialogue_to_doctor_turn_samples():
    conv = dlg.conversations([["病人：头疼", "医生：多久了？", "病人：两天", "医生：建议就诊"]], "auto", "f.json")[0]
    samples = dlg.turn_samples(conv)
    assert [s["messages"][-1]["content"] for s in samples] == ["多久了？", "建议就诊"]
    assert [m["role"] for m in samples[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert dlg.turn_samples(conv, max_history_turns=1)[1]["messages"] == [
        {"role": "user", "content": "两天"}, {"role": "assistant", "content": "建议就诊"}]


def test_bad_dialogue_names_file_record_and_utterance():
    with pytest.raises(ValueError, match=r"x\.json: record 1, utterance 1: starts with neither"):
        dlg.conversations([["病人：a", "医生：b"], ["病人：a", "护士：b"]], "prefixed", "x.json")
    with pytest.raises(ValueError, match=r"s\.json: record 0, turn 0: unknown role 'bot'"):
        dlg.conversations([{"messages": [{"role": "bot", "content": "x"}]}], "auto", "s.json")


def test_sharegpt_and_instruction_formats_and_system_prompt():
    convs = dlg.conversations([{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "嗨"}]},
                               {"instruction": "问", "input": "", "output": "答"}], "auto", "f", system="S")
    assert [c["messages"][0] for c in convs] == [{"role": "system", "content": "S"}] * 2
    assert convs[1]["messages"][1:] == [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]


def test_jsonl_error_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"messages": []}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl: line 2"):
        dlg.load_json_records(p)


def test_split_off_is_seeded_and_disjoint():
    rows = [{"id": i} for i in range(40)]
    a, b = dlg.split_off(rows, 0.05, 7)
    assert (a, b) == dlg.split_off(rows, 0.05, 7)
    assert len(b) == 2 and not {r["id"] for r in a} & {r["id"] for r in b}


def smoke(name, tmp_path, **over):
    return load_config(f"recipes/{name}", {"output_dir": str(tmp_path), **over})


def test_covid_sample_prepare_writes_splits_counts_and_cleaning(tmp_path):
    cfg = smoke("covid-smoke", tmp_path)
    summary = prepare(cfg)
    assert set(summary["counts"]) == {"train", "validate", "test", "val"}
    # 6 + 2 + 2 dialogues with 11 + 3 + 3 doctor turns in the bundled sample
    assert [summary["files"][s]["assistant_turns"] for s in ("train", "validate", "test")] == [11, 3, 3]
    assert summary["counts"]["train"] + summary["counts"]["val"] == 11
    rows = [json.loads(x) for x in (tmp_path / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user" for r in rows)
    report = json.loads((tmp_path / "data" / "cleaning_report.json").read_text())
    assert report["train"]["kept"] == summary["counts"]["train"]
    assert "case study reported 3,471" in (tmp_path / "data" / "counts.md").read_text(encoding="utf-8")


def test_soulchat_sample_prepare_keeps_whole_conversations(tmp_path):
    summary = prepare(smoke("soulchat-smoke", tmp_path))
    assert sum(summary["counts"].values()) == 8
    row = json.loads((tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_missing_data_file_fails_without_output(tmp_path):
    cfg = smoke("covid-smoke", tmp_path, **{"recipe.data.path": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="train_data.json: train file of recipe.data not found"):
        prepare(cfg)
    assert not (tmp_path / "data").exists()


def test_real_covid_counts(shared_data, tmp_path):
    cfg = smoke("covid-smoke", tmp_path, **{"recipe.data.path": str(shared_data / "COVID-Dialogue")})
    summary = prepare(cfg)
    files = summary["files"]
    assert [files[s]["assistant_turns"] for s in ("train", "validate", "test")] == [3922, 367, 458]
    assert [files[s]["dialogues"] for s in ("train", "validate", "test")] == [870, 109, 109]
    assert summary["counts"]["train"] + summary["counts"]["val"] <= 3922


def test_preference_formats_and_errors():
    assert to_pair({"instruction": "问", "input": "补充", "output": ["好", "坏"]}, "w") == ("问\n补充", "好", "坏")
    assert to_pair({"prompt": "p", "chosen": "c", "rejected": "r"}, "w") == ("p", "c", "r")
    with pytest.raises(ValueError, match=r"f: record 3, field output\[1\]"):
        to_pair({"instruction": "q", "output": ["a", ""]}, "f: record 3")


def test_bundled_preferences_are_conversational(tmp_path):
    train, val = load_preferences(smoke("covid-smoke", tmp_path, **{"recipe.preference.source": "file",
                                                                    "recipe.preference.val_fraction": 0.25}))
    assert len(train) + len(val) == 8 and len(val) == 2
    assert train[0]["prompt"][0]["role"] == "user" and train[0]["chosen"][0]["role"] == "assistant"


def test_rl_batch_must_hold_whole_groups(tmp_path):
    from phyassist.recipes.rl import rloo_args

    cfg = smoke("covid-smoke", tmp_path, **{"recipe.rl.num_generations": 3})
    with pytest.raises(ValueError, match="multiple of num_generations"):
        rloo_args(cfg, tmp_path)


def test_rl_generates_several_steps_at_once(tmp_path):
    from phyassist.recipes.rl import rloo_args

    cfg = load_config("recipes/covid-gpu-smollm2", [f"output_dir={tmp_path}"])
    args = rloo_args(cfg, tmp_path)
    assert (args.per_device_train_batch_size, args.num_generations, args.steps_per_generation) == (16, 4, 8)
    assert args.generation_batch_size == 128 and args.max_steps == 100
    cfg = smoke("covid-smoke", tmp_path, **{"recipe.rl.num_generations": 4, "recipe.rl.steps_per_generation": 3})
    with pytest.raises(ValueError, match="multiple of num_generations"):  # 2 completions x 3 steps
        rloo_args(cfg, tmp_path)


def test_rl_prompts_drop_long_and_end_before_the_answer():
    from phyassist.recipes.rl import rl_prompts

    recs = [{"messages": [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a"}]}
            for n in (5, 50)]
    assert rl_prompts(recs, 10, None, 0) == [{"prompt": [{"role": "user", "content": "qqqqq"}]}]
    with pytest.raises(ValueError, match="max_prompt_chars=1"):
        rl_prompts(recs, 1, None, 0)


def test_plots_write_png_and_refuse_empty(tmp_path):
    from phyassist.recipes.plots import plot_bars, plot_curves

    hist = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]
    p = plot_curves(hist, {"loss": "train", "eval_loss": "val"}, "t", tmp_path / "a.png")
    assert p.read_bytes()[:4] == b"\x89PNG"
    assert plot_bars({"SFT": 10, "SFT+RL": 14}, "len", tmp_path / "b.png", "chars").exists()
    with pytest.raises(ValueError, match="none of"):
        plot_curves(hist, {"kl": "KL"}, "RL", tmp_path / "c.png")


def tiny_model(kind: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    conf = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    config = LlamaConfig(**conf) if kind == "llama" else Qwen2Config(**conf)
    return AutoModelForCausalLM.from_config(config).eval()


def random_adapter(model, folder: Path, seed: int, targets):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(folder))
    return peft_model.unload()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_stacked_sft_rl_equals_rl_on_merged_sft(tmp_path, kind):
    """What RL trained (RL adapter on SFT-merged weights) == what predict/chat run (both stacked)."""
    import copy

    import torch
    from peft import PeftModel

    from phyassist.models.inference import attach

    base = tiny_model(kind)
    base = random_adapter(base, tmp_path / "sft", 1, ["q_proj", "v_proj"])
    base = random_adapter(base, tmp_path / "rl", 2, ["q_proj", "v_proj", "o_proj"])
    ids = torch.randint(0, 64, (2, 9))
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "sft")).merge_and_unload()
    trained = PeftModel.from_pretrained(merged, str(tmp_path / "rl")).eval()
    stacked = attach(copy.deepcopy(base), [tmp_path / "sft", tmp_path / "rl"]).eval()
    assert sorted(stacked.base_model.active_adapters) == ["rl", "sft"]
    with torch.no_grad():
        want, got = trained(ids).logits, stacked(ids).logits
        sft_only = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "sft")).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, sft_only, atol=1e-3)  # the RL adapter really contributes


def test_adapter_names_are_distinct():
    from phyassist.models.inference import adapter_names

    assert adapter_names(["runs/x/sft/best_adapter", "runs/x/rl/adapter", "y/rl/adapter"]) == \
        ["best_adapter", "rl", "rl_2"]


def test_not_an_adapter_folder_is_named(tmp_path):
    from phyassist.models.inference import attach

    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        attach(object(), [tmp_path])


def test_validate_rejects_bad_unit():
    from phyassist.config import ConfigError

    with pytest.raises(ConfigError, match="recipe.data.unit"):
        validate({"recipe": {"kind": "covid", "data": {"unit": "sentence"}}})
