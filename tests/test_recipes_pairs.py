"""Recipe B's middle, without training: preference pairs built from dialogues (constructions,
split hygiene, length balance), the bootstrap intervals, and the reward-model report that must
catch a "longer is better" scorer."""

import json
import random

import numpy as np
import pytest

from phyassist.config import CONFIG_DIR, ConfigError, load_config
from phyassist.recipes import bootstrap as bs
from phyassist.recipes import dialogues as dlg
from phyassist.recipes.data import prepare
from phyassist.recipes.pairs import (build_pairs, build_preference_splits, check_disjoint, generation_requests,
                                     units)
from phyassist.recipes.preference import preference_splits
from phyassist.recipes.reward_eval import accuracy_report, report_markdown, verdict

ZH_REPLIES = ["建议多喝水，注意休息，监测体温变化。", "可以先居家观察，如果发热超过三天请到发热门诊。",
              "这个情况不用太担心，不是新冠的典型表现。", "请把化验单拍照发给我，我帮您看一下。",
              "血压控制平稳的话可以接种疫苗，接种后留观半小时。", "咳嗽有痰可以吃点止咳化痰的药，多喝温水。",
              "如果出现呼吸困难、胸痛，要马上就医。", "孩子精神状态好的话，先物理降温观察。"]


def zh_records(n_dialogues: int = 12, source: str = "train_data.json") -> list[dict]:
    """Turn samples of synthetic two-turn dialogues (as the data step writes them)."""
    rng = random.Random(0)
    convs = [[f"病人：第{i}位病人，发烧咳嗽怎么办？", f"医生：{rng.choice(ZH_REPLIES)}", "病人：还需要注意什么？",
              f"医生：{rng.choice(ZH_REPLIES)}"] for i in range(n_dialogues)]
    return [s for c in dlg.conversations(convs, "prefixed", source) for s in dlg.turn_samples(c)]


def pcfg(**over):
    return load_config("recipes/covid-smoke", {f"recipe.preference.{k}": v for k, v in over.items()}).recipe.preference


def by_name(pairs):
    out = {}
    for p in pairs:
        out.setdefault(p["construction"], []).append(p)
    return out


def text(p, side):
    return p[side][0]["content"]


# --- splits: no dialogue on both sides ----------------------------------------------------------------------------

def test_split_off_dialogues_keeps_every_dialogue_on_one_side():
    recs = zh_records(40)
    rest, held = dlg.split_off_dialogues(recs, 0.1, 3)
    assert (rest, held) == dlg.split_off_dialogues(recs, 0.1, 3)
    a, b = {dlg.dialogue_key(r) for r in rest}, {dlg.dialogue_key(r) for r in held}
    assert len(b) == 4 and not a & b and len(rest) + len(held) == len(recs)


def test_data_step_holds_out_whole_dialogues(tmp_path):
    cfg = load_config("recipes/covid-smoke", {"output_dir": str(tmp_path), "recipe.data.val_fraction": 0.4})
    prepare(cfg)
    keys = {s: {dlg.dialogue_key(r) for r in dlg.read_jsonl(tmp_path / "data" / f"{s}.jsonl")}
            for s in ("train", "val")}
    assert keys["train"] and keys["val"] and not keys["train"] & keys["val"]


# --- the constructions ---------------------------------------------------------------------------------------------

def test_each_construction_is_what_it_says():
    pairs, skipped = build_pairs(zh_records(), "train", pcfg(length_tolerance=0.5), "zh", seed=1)
    groups = by_name(pairs)
    assert set(groups) == {"other_patient", "truncated", "off_topic_tail", "spliced"}
    for p in pairs:
        assert text(p, "chosen") != text(p, "rejected") and p["prompt"][-1]["role"] == "user"
        assert p["donor"] != p["dialogue"] and p["split"] == "train"
    for p in groups["truncated"]:
        assert text(p, "chosen").startswith(text(p, "rejected")) and p["donor"] is None
        assert 0.3 <= len(text(p, "rejected")) / len(text(p, "chosen")) <= 0.7 + 1 / len(text(p, "chosen"))
    for p in groups["off_topic_tail"]:
        assert text(p, "rejected").startswith(text(p, "chosen")) and p["donor"]
    for p in groups["other_patient"]:
        c, r = len(text(p, "chosen")), len(text(p, "rejected"))
        assert abs(r - c) <= 0.5 * c and p["donor"]
    for p in groups["spliced"]:
        assert len(text(p, "rejected")) == len(text(p, "chosen"))
        head = len(text(p, "chosen")) * 2 // 5  # at least 40 % of the real reply is kept
        assert text(p, "rejected")[:head] == text(p, "chosen")[:head]


def test_constructions_come_in_equal_shares_and_are_seeded():
    recs = zh_records(30)
    pairs, skipped = build_pairs(recs, "train", pcfg(length_tolerance=0.5), "zh", seed=1)
    counts = [len(v) + skipped.get(k, 0) for k, v in by_name(pairs).items()]
    assert max(counts) - min(counts) <= 1 and sum(counts) == len(recs)
    assert build_pairs(recs, "train", pcfg(length_tolerance=0.5), "zh", seed=1)[0] == pairs
    assert build_pairs(recs, "train", pcfg(length_tolerance=0.5), "zh", seed=2)[0] != pairs


def test_pairs_per_sample_and_chosen_filters():
    recs = zh_records(10)
    two, _ = build_pairs(recs, "train", pcfg(length_tolerance=0.5, pairs_per_sample=2), "zh", seed=1)
    per_reply = {}
    for p in two:
        per_reply.setdefault((p["dialogue"], len(p["prompt"])), set()).add(p["construction"])
    assert all(len(v) == 2 for v in per_reply.values())
    only, _ = build_pairs(recs, "train", pcfg(constructions=["truncated"], max_prompt_chars=20), "zh", seed=1)
    assert only and all(len(p["prompt"]) == 1 for p in only)  # second turns' prompts are longer than 20
    assert build_pairs(recs, "train", pcfg(min_reply_chars=100), "zh", seed=1)[0] == []


def test_english_cuts_fall_between_words():
    recs = [s for c in dlg.conversations(
        [[f"Patient: case {i}, I have a cough", f"Doctor: {r}"] for i, r in enumerate(
            ["Drink plenty of water and rest for a few days please", "Please send me your latest blood test results",
             "Go to the emergency room if breathing gets hard", "A mild fever like this usually passes in a week"])],
        "prefixed", "t.json", user_prefix="Patient:", assistant_prefix="Doctor:") for s in dlg.turn_samples(c)]
    pairs, _ = build_pairs(recs, "train", pcfg(constructions=["truncated", "spliced"], length_tolerance=0.5),
                           "en", seed=0)
    words = {w for r in recs for w in units(r["messages"][-1]["content"], "en")}
    assert pairs and all(set(text(p, "rejected").split()) <= words for p in pairs)


def test_pair_splits_never_share_a_dialogue(tmp_path):
    cfg = load_config("recipes/covid-smoke", {"output_dir": str(tmp_path), "recipe.preference.length_tolerance": 0.5})
    built = build_preference_splits(cfg, {"train": zh_records(12), "test": zh_records(6, "test_data.json")})
    seen = {s: {k for p in ps for k in (p["dialogue"], p["donor"]) if k} for s, ps in built.items()}
    assert seen["train"] and seen["test"] and not seen["train"] & seen["test"]
    assert all(k.startswith("test_data.json:") for k in seen["test"])
    report = json.loads((tmp_path / "preference" / "report.json").read_text())
    assert report["splits"]["train"]["pairs"] == len(built["train"])
    with pytest.raises(ValueError, match="has preference pairs in both train and test"):
        check_disjoint({"train": built["train"][:1], "test": [dict(built["train"][0], split="test")]})


ALL5 = ["other_patient", "truncated", "off_topic_tail", "spliced", "sft_sample"]


def test_sft_sample_takes_the_generated_reply_of_the_same_prompt():
    recs, p = zh_records(20), pcfg(length_tolerance=0.5, constructions=ALL5)
    asked = generation_requests(recs, "train", p, seed=1)
    assert len(asked) == 8 and len({c["key"] for c in asked}) == 8  # a fifth of the 40 replies
    assert generation_requests(recs, "train", pcfg(length_tolerance=0.5), seed=1) == []  # not in the defaults
    model_says = {c["key"]: f"模型的回答{i}：多休息。" for i, c in enumerate(asked)}
    model_says[asked[0]["key"]] = asked[0]["reply"]  # the model reproduced the doctor: no pair
    pairs, skipped = build_pairs(recs, "train", p, "zh", seed=1, generated=model_says)
    mine = by_name(pairs)["sft_sample"]
    assert len(mine) == len(asked) - 1 and skipped.get("sft_sample") == 1
    by_prompt = {json.dumps(c["prompt"], ensure_ascii=False): model_says[c["key"]] for c in asked}
    for pair in mine:
        assert text(pair, "rejected") == by_prompt[json.dumps(pair["prompt"], ensure_ascii=False)]
        assert pair["donor"] is None and text(pair, "chosen") != text(pair, "rejected")
    # the other constructions draw as before: the requests are the plan build_pairs follows
    assert [x for x in pairs if x["construction"] != "sft_sample"] == \
        [x for x in build_pairs(recs, "train", p, "zh", seed=1)[0]]
    none, skipped = build_pairs(recs, "train", p, "zh", seed=1)  # nothing generated: skipped, not invented
    assert "sft_sample" not in by_name(none) and skipped["sft_sample"] == len(asked)


def test_sft_sample_without_an_sft_adapter_is_skipped_and_said(tmp_path, capsys):
    cfg = load_config("recipes/covid-smoke", {"output_dir": str(tmp_path), "recipe.preference.constructions": ALL5})
    prepare(cfg)
    s = preference_splits(cfg)
    assert s["train"] and not any(x["construction"] == "sft_sample" for x in s["train"])
    report = json.loads((tmp_path / "preference/report.json").read_text())
    assert report["splits"]["train"]["skipped"]["sft_sample"] > 0
    assert "no SFT adapter" in report["notes"][0] and "run the recipe's sft step" in report["notes"][0]
    assert "Note: sft_sample pairs not built" in (tmp_path / "preference/report.md").read_text(encoding="utf-8")
    assert "sft_sample pairs not built" in capsys.readouterr().out


def test_preference_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="truncate_range"):
        pcfg(truncate_range=[0.9, 0.2])
    with pytest.raises(ConfigError, match="pairs_per_sample"):
        pcfg(constructions=["truncated"], pairs_per_sample=2)
    with pytest.raises(ConfigError, match="recipe.preference.constructions"):
        pcfg(constructions=["shuffled"])


def test_covid_sample_pairs_from_the_data_step(tmp_path):
    cfg = load_config("recipes/covid-smoke", {"output_dir": str(tmp_path)})
    prepare(cfg)
    s = preference_splits(cfg)
    assert s["train"] and s["held_out"] and cfg.recipe.preference.source == "dialogues"
    assert all(p["split"] == "test" for p in s["held_out"])
    capped = preference_splits(load_config("recipes/covid-smoke", {"output_dir": str(tmp_path),
                                                                   "recipe.preference.max_held_out_pairs": 1}))
    assert len(capped["held_out"]) == 1 and capped["held_out"][0] in s["held_out"]


def test_soulchat_conversations_become_one_pair_per_counselor_turn(tmp_path):
    cfg = load_config("recipes/soulchat-smoke", {"output_dir": str(tmp_path), "recipe.preference.source": "dialogues",
                                                 "recipe.preference.length_tolerance": 0.6})
    prepare(cfg)
    s = preference_splits(cfg)
    pairs = s["train"] + s["val"] + s["held_out"]
    assert pairs and all(p["prompt"][0]["role"] == "system" and p["prompt"][-1]["role"] == "user" for p in pairs)
    assert any(len(p["prompt"]) > 2 for p in pairs)  # later counselor turns keep the earlier ones as history


def test_my_clinic_yaml_only_example(tmp_path):
    """docs/recipes.md's "my clinic": English Patient:/Doctor: files, YAML only, pairs without a file."""
    data = tmp_path / "clinic"
    data.mkdir()
    lines = ["Drink water and rest for two days", "Please come in for a blood test this week",
             "Your blood pressure is fine, keep the same dose", "Call us at once if the pain spreads to your arm",
             "A cough after a cold can last three weeks", "Take the tablets with food to spare your stomach"]
    for name, n in (("train.json", 12), ("test.json", 4)):
        convs = [[f"Patient: visit {i}: what should I do?", f"Doctor: {lines[(i * 5 + len(name)) % 6]} now",
                  "Patient: anything else?", f"Doctor: {lines[i % 6]}"] for i in range(n)]
        (data / name).write_text(json.dumps(convs), encoding="utf-8")
    yaml = tmp_path / "my-clinic.yaml"
    yaml.write_text(f"""base: {CONFIG_DIR / 'recipes' / 'covid.yaml'}
name: my-clinic
output_dir: {tmp_path / 'run'}
recipe:
  lang: en
  data:
    download: false
    path: {data}
    files: {{train: train.json, test: test.json, validate: null}}
    format: prefixed
    user_prefix: "Patient:"
    assistant_prefix: "Doctor:"
  preference: {{source: dialogues, length_tolerance: 0.5}}
""", encoding="utf-8")
    cfg = load_config(yaml)
    prepare(cfg)
    s = preference_splits(cfg)
    assert s["train"] and s["held_out"] and all(p["dialogue"].startswith("test.json:") for p in s["held_out"])


def test_real_covid_pairs_balance_length(shared_data, tmp_path):
    # the four constructions built from the dialogues alone (sft_sample needs the SFT model's replies)
    cfg = load_config("recipes/covid-gpu-smollm2", {
        "output_dir": str(tmp_path), "recipe.data.path": str(shared_data / "COVID-Dialogue"),
        "recipe.preference.constructions": ["other_patient", "truncated", "off_topic_tail", "spliced"]})
    prepare(cfg)
    s = preference_splits(cfg)
    report = json.loads((tmp_path / "preference" / "report.json").read_text())
    for split in ("train", "val", "test"):
        r = report["splits"][split]
        assert 0.4 < r["chosen_longer"] < 0.6, split  # a length-only scorer is near chance overall
        assert r["constructions"]["truncated"]["chosen_longer"] == 1.0
        assert r["constructions"]["off_topic_tail"]["chosen_longer"] == 0.0
    assert len(s["held_out"]) > 300 and {p["split"] for p in s["held_out"]} == {"test"}


# --- bootstrap -----------------------------------------------------------------------------------------------------

def test_bootstrap_bleu_and_rouge_match_the_kits_metrics():
    from phyassist.evaluate.metrics import bleu, rouge

    preds = ["建议多喝水注意休息", "可以先居家观察", "请把化验单发给我", "不是新冠的典型表现"]
    refs = ["建议多喝水，注意休息，监测体温。", "先居家观察三天", "化验单拍照发给我看看", "这不是新冠"]
    iv = bs.interval(bs.bleu_stats(preds, refs, "zh"), bs.bleu_score, reps=200)
    assert iv["value"] == pytest.approx(bleu(preds, refs, "zh"), abs=1e-3) and iv["low"] <= iv["value"] <= iv["high"]
    per = bs.rouge_per_example(preds, refs, "zh")
    assert {k: round(v.mean(), 4) for k, v in per.items()} == pytest.approx(rouge(preds, refs, "zh"), abs=1e-3)
    assert bs.rouge_per_example(["头疼发烧"], ["头疼发烧"], "zh")["rouge1"][0] == 100  # characters, not dropped


def test_bootstrap_interval_shrinks_with_data_and_pairs_cancel():
    rng = np.random.default_rng(0)
    small, big = rng.normal(1, 1, 30), rng.normal(1, 1, 3000)
    a = bs.interval(bs.mean_stats(small), bs.mean_score)
    b = bs.interval(bs.mean_stats(big), bs.mean_score)
    assert a["low"] < a["value"] < a["high"] and (b["high"] - b["low"]) < (a["high"] - a["low"]) / 5
    same = bs.paired_interval(bs.mean_stats(small), bs.mean_stats(small), bs.mean_score)
    assert same == {"value": 0.0, "low": 0.0, "high": 0.0}
    shifted = bs.paired_interval(bs.mean_stats(small), bs.mean_stats(small + 2), bs.mean_score)
    assert shifted["low"] == pytest.approx(2) and shifted["high"] == pytest.approx(2)


def test_bootstrap_resamples_whole_groups():
    values = np.repeat([0.0, 1.0], 50)  # two dialogues of 50 identical turns each
    per_turn = bs.interval(bs.mean_stats(values), bs.mean_score, reps=300)
    per_dialogue = bs.interval(bs.mean_stats(values), bs.mean_score, groups=[0] * 50 + [1] * 50, reps=300)
    assert per_dialogue["high"] - per_dialogue["low"] > 3 * (per_turn["high"] - per_turn["low"])
    with pytest.raises(ValueError, match="3 groups for 100 examples"):
        bs.interval(bs.mean_stats(values), bs.mean_score, groups=[0, 1, 2])


# --- the reward-model report ---------------------------------------------------------------------------------------

def balanced_pairs():
    return build_pairs(zh_records(40), "test", pcfg(length_tolerance=0.5), "zh", seed=4)[0]


def test_length_only_reward_model_is_caught():
    pairs = balanced_pairs()
    lengths = [(len(text(p, "chosen")), len(text(p, "rejected"))) for p in pairs]
    rep = accuracy_report(pairs, [a for a, _ in lengths], [b for _, b in lengths], "zh")
    assert rep["all"]["reward_model"] == rep["all"]["length_baseline"]
    assert rep["all"]["reward_model_minus_length"]["value"] == 0
    assert rep["rejected_not_shorter"]["reward_model"]["value"] <= 0.5
    assert rep["by_construction"]["off_topic_tail"]["reward_model"]["value"] == 0
    assert "not distinguishable from the length-only scorer" in verdict(rep)


def test_a_reward_model_that_knows_the_answer_beats_chance_and_length():
    pairs = balanced_pairs()
    rep = accuracy_report(pairs, [1.0] * len(pairs), [0.0] * len(pairs), "zh")
    assert rep["all"]["reward_model"]["value"] == 1 and rep["all"]["reward_model_minus_length"]["low"] > 0
    assert "above chance, better than the length-only scorer" in verdict(rep)
    noise = np.random.default_rng(1).normal(size=(2, len(pairs)))
    assert "NOT distinguishable from chance" in verdict(accuracy_report(pairs, noise[0], noise[1], "zh"))
    md = report_markdown(rep)
    assert "| construction: truncated |" in md and "| rejected not shorter |" in md
    with pytest.raises(ValueError, match="pairs"):
        accuracy_report(pairs, [1.0], [0.0], "zh")
