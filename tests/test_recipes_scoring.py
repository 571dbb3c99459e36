"""Recipe B's reward scoring and predict step without training (CPU, tiny stand-ins):

* scoring is batched, on the reward model's device, without autograd, truncated from the left;
* the reward model is moved to the scoring device (a GPU when there is one: it used to stay on the
  CPU, and the predict step's 1,371 answers did not finish in minutes on an H200);
* a resumed predict step with finished predictions loads no generation model, scores every answer in
  one batched pass, and caches the scores;
* without the reward adapter's weights the text metrics and intervals are still written, saying why
  the reward score is missing.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from phyassist.config import load_config
from phyassist.recipes import reward as reward_mod
from phyassist.recipes.data import prepare, read_split
from phyassist.recipes.predict import held_out, predict_covid, safe

TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


def tiny_tokenizer(words=("system", "user", "assistant", "a", "b", "c", "d", "end")):
    """A whitespace word-level fast tokenizer with a chat template (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", padding_side="right")
    tok.chat_template = TEMPLATE
    return tok


class CountingScorer(torch.nn.Module):
    """A stand-in reward model: the score is the number of real tokens; every call is recorded."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    @property
    def device(self):
        return self.w.device

    def forward(self, input_ids, attention_mask):
        self.calls.append({"shape": tuple(input_ids.shape), "device": input_ids.device, "ids": input_ids.tolist(),
                           "grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled()})
        return SimpleNamespace(logits=attention_mask.sum(-1, keepdim=True).to(torch.float32) + self.w)


def convs(n):
    return [[{"role": "user", "content": "a " * (i + 1)}, {"role": "assistant", "content": "b c end"}]
            for i in range(n)]


def test_score_is_batched_on_the_model_device_without_grad():
    model, tok = CountingScorer(), tiny_tokenizer()
    got = reward_mod.score(model, tok, convs(10), batch_size=4, progress=False)
    assert [c["shape"][0] for c in model.calls] == [4, 4, 2]  # batches, not one by one
    assert all(c["device"] == model.device and not c["grad"] and c["inference"] for c in model.calls)
    assert got == [float(i + 6) for i in range(10)]  # input order: "user a×(i+1) assistant b c end"
    assert max(c["shape"][1] for c in model.calls[1:]) < model.calls[0]["shape"][1]  # longest first, little padding


def test_score_truncates_from_the_left_keeping_the_answer():
    model, tok = CountingScorer(), tiny_tokenizer()
    got = reward_mod.score(model, tok, convs(6), batch_size=8, max_length=5, progress=False)
    assert max(got) == 5.0
    end = tok.convert_tokens_to_ids("end")
    assert all(row[-1] == end or end in row for row in model.calls[0]["ids"])  # the answer's end survives
    assert tok.truncation_side == "right"  # restored


def test_scoring_device_is_the_gpu_when_there_is_one(monkeypatch):
    from phyassist.recipes.common import scoring_device

    cfg = load_config("recipes/covid-gpu-smollm2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert scoring_device(cfg) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert scoring_device(cfg) == torch.device("cuda", 1)
    assert scoring_device(load_config("recipes/covid-smoke")) == torch.device("cpu")  # device_map: cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scoring_device(cfg) == torch.device("cpu")


def tiny_reward_adapter(folder, dtype=torch.bfloat16):
    """A tiny Llama sequence classifier and a saved SEQ_CLS LoRA adapter (with the score head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def base():
        torch.manual_seed(0)
        conf = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
        return LlamaForSequenceClassification(conf).to(dtype)

    get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="SEQ_CLS")
                   ).save_pretrained(str(folder))
    return base


def test_reward_model_is_moved_to_the_scoring_device(tmp_path, monkeypatch):
    """The regression: load_reward_model left the merged model where from_pretrained put it (the CPU)."""
    from phyassist.recipes import common

    base = tiny_reward_adapter(tmp_path / "rm")
    monkeypatch.setattr(reward_mod, "load_reward_base", lambda cfg: (base(), tiny_tokenizer()))
    cfg = load_config("recipes/covid-smoke")
    monkeypatch.setattr(common, "scoring_device", lambda cfg: torch.device("meta"))  # stands in for a GPU
    model, _ = reward_mod.load_reward_model(cfg, tmp_path / "rm")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    monkeypatch.setattr(common, "scoring_device", lambda cfg: torch.device("cpu"))
    model, _ = reward_mod.load_reward_model(cfg, tmp_path / "rm")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # bf16 kernels are slow on a CPU


def test_reward_adapter_without_weights_is_named(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm/adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        reward_mod.load_reward_model(load_config("recipes/covid-smoke"), tmp_path / "rm")


@pytest.fixture
def finished_predictions(tmp_path):
    """covid-smoke's data step, and both variants' predictions already written (as a resumed run has)."""
    cfg = load_config("recipes/covid-smoke", {"output_dir": str(tmp_path / "run"), "recipe.predict.max_examples": 5,
                                              "recipe.reward.per_device_eval_batch_size": 4})
    prepare(cfg)
    records = held_out(cfg, read_split(cfg, "test"))
    for name, text in (("SFT", "多喝水"), ("SFT+RL", "多喝水，注意休息")):
        rows = [{"id": r["id"], "prompt": r["messages"][:-1], "prediction": text,
                 "reference": r["messages"][-1]["content"]} for r in records]
        path = cfg.out / "predict" / f"{safe(name)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    return cfg, records


def no_generation(monkeypatch):
    import phyassist.models.inference as inference

    def refuse(*a, **k):
        raise AssertionError("the predict step loaded a generation model although every prediction exists")

    monkeypatch.setattr(inference, "load_for_inference", refuse)


def test_resumed_predict_scores_in_one_batched_pass_and_regenerates_nothing(finished_predictions, monkeypatch):
    cfg, records = finished_predictions
    no_generation(monkeypatch)
    rm = cfg.out / "reward" / "adapter"
    rm.mkdir(parents=True)
    (rm / "adapter_config.json").write_text("{}")
    (rm / "adapter_model.safetensors").write_bytes(b"weights")
    loads, calls, scorer = [], [], CountingScorer()
    monkeypatch.setattr(reward_mod, "load_reward_model", lambda cfg, a: loads.append(a) or (scorer, tiny_tokenizer()))
    real_score = reward_mod.score
    monkeypatch.setattr(reward_mod, "score", lambda *a, **k: calls.append((a, k)) or real_score(*a, **k))
    before = {p.name: p.stat().st_mtime_ns for p in (cfg.out / "predict").glob("*.jsonl")}
    scores = predict_covid(cfg, read_split(cfg, "test"), cfg.out / "sft/adapter", cfg.out / "rl/adapter", rm)
    assert len(loads) == 1 and len(calls) == 1  # one reward model, one pass over every answer
    (args, _), n = calls[0], len(records)
    assert len(args[2]) == 3 * n and args[3] == 4  # SFT, SFT+RL and the reference; recipe.reward batch size
    assert [c["shape"][0] for c in scorer.calls] == [4] * (3 * n // 4) + ([3 * n % 4] if 3 * n % 4 else [])
    assert {"reward", "reward_ref"} <= set(scores["SFT"])
    iv = json.loads((cfg.out / "predict/intervals.json").read_text())
    assert "reward" in iv["metrics"] and "reward_not_computed" not in iv
    assert {p.name: p.stat().st_mtime_ns for p in (cfg.out / "predict").glob("*.jsonl")} == before
    # again: the scores come from predict/rewards.json, no reward model is loaded
    again = predict_covid(cfg, read_split(cfg, "test"), cfg.out / "sft/adapter", cfg.out / "rl/adapter", rm)
    assert len(loads) == 1 and again["SFT"]["reward"] == scores["SFT"]["reward"]
    # new reward weights: scored afresh
    (rm / "adapter_model.safetensors").write_bytes(b"other weights")
    predict_covid(cfg, read_split(cfg, "test"), cfg.out / "sft/adapter", cfg.out / "rl/adapter", rm)
    assert len(loads) == 2


def test_predict_without_reward_weights_writes_text_metrics_and_says_why(finished_predictions, monkeypatch, capsys):
    cfg, records = finished_predictions
    no_generation(monkeypatch)
    rm = cfg.out / "reward" / "adapter"
    rm.mkdir(parents=True)
    (rm / "adapter_config.json").write_text("{}")  # a run folder copied without its weights
    scores = predict_covid(cfg, read_split(cfg, "test"), cfg.out / "sft/adapter", cfg.out / "rl/adapter", rm)
    assert {"bleu", "rouge1", "rougeL", "mean_length"} <= set(scores["SFT"]) and "reward" not in scores["SFT"]
    iv = json.loads((cfg.out / "predict/intervals.json").read_text())
    assert set(iv["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL", "mean_length"}
    assert "has no weights" in iv["reward_not_computed"]
    for md in ("metrics.md", "intervals.md"):
        text = (cfg.out / "predict" / md).read_text(encoding="utf-8")
        assert "Reward-model score: not computed" in text and "has no weights" in text, md
    assert "reward-model score NOT computed" in capsys.readouterr().out
