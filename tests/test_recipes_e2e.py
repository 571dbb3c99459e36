"""Recipe B end to end on the embedded default (CPU, bundled synthetic samples, a step or two
each): data -> SFT -> reward model -> RL -> predict, through the CLI as a student runs it."""

import json

import pytest

from phyassist.cli import main as cli_main

TINY = ["model.max_seq_length=128", "recipe.rl.max_completion_length=4", "recipe.predict.max_examples=1",
        "recipe.predict.max_new_tokens=4", "recipe.rl.max_prompts=2"]
# sft_sample first: the first reply of every split's shuffle gets it, so each split has one
WITH_SFT_SAMPLE = "recipe.preference.constructions=[sft_sample,other_patient,truncated,off_topic_tail,spliced]"


@pytest.fixture(scope="module")
def covid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("covid")
    assert cli_main(["recipe", "--config", "recipes/covid-smoke", "-o", str(out), *TINY, WITH_SFT_SAMPLE]) == 0
    return out


def test_covid_chain_writes_every_artifact(covid_run):
    out = covid_run
    for step in ("sft/adapter", "reward/adapter", "rl/adapter"):
        assert (out / step / "adapter_config.json").exists(), step
    sft = json.loads((out / "sft/adapter/phyassist_train.json").read_text())
    assert sft["weights"] == "best" and sft["best_checkpoint"].startswith("checkpoint-")  # lowest eval loss
    for img in ("sft_loss", "reward_loss", "rl_reward", "rl_kl", "rl_length", "covid_length"):
        assert (out / "images" / f"{img}.png").read_bytes()[:4] == b"\x89PNG", img
    assert (out / "config.resolved.yaml").exists()


def test_reward_model_learned_from_pairs_built_from_the_dialogues(covid_run):
    report = json.loads((covid_run / "preference/report.json").read_text())
    assert report["splits"]["train"]["pairs"] > 0 and report["splits"]["test"]["pairs"] > 0
    held = json.loads((covid_run / "reward/eval.json").read_text())
    assert held["chance"] == 0.5 and held["all"]["pairs"] == report["splits"]["test"]["pairs"]
    for key in ("reward_model", "length_baseline", "reward_model_minus_length"):
        iv = held["all"][key]
        assert iv["low"] <= iv["value"] <= iv["high"], key
    assert "length baseline" in (covid_run / "reward/eval.md").read_text(encoding="utf-8")


def test_sft_sample_pairs_hold_the_sft_models_cached_replies(covid_run, monkeypatch):
    """The reward step generated the SFT model's reply for the sft_sample pairs (every split, each on
    its own split's prompt), cached them, and a rebuild of the pairs generates nothing."""
    from phyassist.config import load_config
    from phyassist.recipes import sft_samples
    from phyassist.recipes.common import text_key
    from phyassist.recipes.preference import dialogue_preferences

    def rows(path):
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]

    cached = {c["prompt"]: c["text"] for c in rows(covid_run / "preference/sft_samples.jsonl")}
    pairs = {s: rows(covid_run / f"preference/{s}.jsonl") for s in ("train", "val", "validate", "test")}
    mine = [p for ps in pairs.values() for p in ps if p["construction"] == "sft_sample"]
    assert {"train", "test"} <= {p["split"] for p in mine}
    for p in mine:
        assert p["rejected"][0]["content"] == cached[text_key(p["prompt"])] and p["donor"] is None
    eval_md = (covid_run / "reward/eval.md").read_text(encoding="utf-8")
    assert "construction: sft_sample" in eval_md  # the held-out accuracy has its own row
    monkeypatch.setattr(sft_samples, "generate", lambda *a, **k: pytest.fail("SFT replies generated again"))
    cfg = load_config("recipes/covid-smoke", [*TINY, WITH_SFT_SAMPLE, f"output_dir={covid_run}"])
    assert dialogue_preferences(cfg)["test"] == pairs["test"]


def test_reward_adapter_carries_the_scalar_head(covid_run):
    cfg = json.loads((covid_run / "reward/adapter/adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in (cfg.get("modules_to_save") or [])


def test_rl_adapter_is_fresh_and_logged_reward_and_kl(covid_run):
    rl = json.loads((covid_run / "rl/adapter/adapter_config.json").read_text())
    assert rl["r"] == 8 and sorted(rl["target_modules"]) == ["q_proj", "v_proj"]
    hist = json.loads((covid_run / "rl/log_history.json").read_text())
    assert any("kl" in h for h in hist) and any("reward" in h for h in hist)


def test_predictions_compare_sft_with_stacked_sft_rl(covid_run):
    metrics = json.loads((covid_run / "predict/metrics.json").read_text())
    assert set(metrics) == {"SFT", "SFT+RL"}
    assert {"bleu", "rouge1", "rougeL", "mean_length"} <= set(metrics["SFT"])
    rows = [json.loads(x) for x in (covid_run / "predict/SFT_RL.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and rows[0]["reference"] and rows[0]["prompt"][-1]["role"] == "user"


def test_predictions_carry_intervals_reward_scores_and_side_by_side(covid_run):
    iv = json.loads((covid_run / "predict/intervals.json").read_text())
    assert set(iv["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL", "reward", "mean_length"}
    assert set(iv["metrics"]["reward"]) == {"SFT", "SFT+RL", "SFT+RL − SFT", "reference"}
    metrics = json.loads((covid_run / "predict/metrics.json").read_text())
    assert iv["metrics"]["bleu"]["SFT"]["value"] == pytest.approx(metrics["SFT"]["bleu"], abs=1e-3)
    assert iv["metrics"]["reward"]["SFT+RL"]["value"] == pytest.approx(metrics["SFT+RL"]["reward"], abs=1e-3)
    side = (covid_run / "predict/side_by_side.md").read_text(encoding="utf-8")
    assert "**reference (doctor)**" in side and "**SFT+RL** (reward" in side


def test_predict_rerun_reuses_finished_predictions(covid_run):
    path = covid_run / "predict/SFT.jsonl"
    before = path.stat().st_mtime_ns
    assert cli_main(["recipe", "--config", "recipes/covid-smoke", "-o", str(covid_run), *TINY,
                     "--steps", "predict"]) == 0
    assert path.stat().st_mtime_ns == before


def test_rl_without_reward_model_names_what_to_run(tmp_path, capsys):
    assert cli_main(["recipe", "--config", "recipes/covid-smoke", "-o", str(tmp_path), "--steps", "rl"]) == 1
    assert "run the recipe's data step first" in capsys.readouterr().err
