"""Generate on a recipe's held-out samples with several adapter set-ups of ONE loaded model and
score them against the reference answers (the kit's metrics, Chinese tokenization).

Recipe A compares the base (adapters disabled) with the fine-tuned model; recipe B compares the
SFT adapter alone with SFT + RL stacked, and plots the mean answer length of each (the case
study's observation: RL made answers longer); recipe B also scores every answer with the reward
model and gives each metric a bootstrap interval over test dialogues (:mod:`.bootstrap`). Each
variant's predictions are written as soon as it finishes, so a rerun after a crash only generates
what is missing, and loads no generation model at all when every variant's predictions exist (the
adapters' weights are then not needed). The reward scores are cached too (``predict/rewards.json``,
tied to the reward adapter's weights and the answers). Without usable reward-adapter weights the
text metrics and their intervals are still written, with a line saying the reward score was not
computed and why.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from phyassist.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from phyassist.recipes.common import (adapter_fingerprint, adapter_problem, free_accelerator_memory, images_dir,
                                      step_dir, text_key)
from phyassist.recipes.dialogues import prompt_messages, reference, seeded_cap

LABELS = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "cosine": "cosine",
          "length_quality": "length quality", "reward": "reward-model score", "reward_ref": "reference's reward",
          "mean_length": "mean length (chars)", "mean_length_ref": "reference length (chars)"}


def held_out(cfg, records: list[dict]) -> list[dict]:
    return seeded_cap(records, cfg.recipe.predict.max_examples, cfg.seed)


def chat_prompts(tok, records: list[dict]) -> list[str]:
    return [tok.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
            for r in records]


def finished_predictions(path: Path, records: list[dict]) -> list[str] | None:
    """The answers a previous run wrote to ``path`` for exactly these records (None: not there)."""
    if path.exists():
        done = read_jsonl(path)
        if [d["id"] for d in done] == [r["id"] for r in records]:
            return [d["prediction"] for d in done]
    return None


def generate_variant(model, tok, records: list[dict], path: Path, pcfg, desc: str) -> list[str]:
    """Answers for ``records`` (read back from ``path`` when a previous run finished them)."""
    from phyassist.evaluate.generate import generate_batched

    done = finished_predictions(path, records)
    if done is not None:
        return done
    preds = generate_batched(model, tok, chat_prompts(tok, records), max_new_tokens=pcfg.max_new_tokens,
                             batch_size=pcfg.batch_size, desc=desc)
    atomic_write_jsonl(path, [{"id": r["id"], "prompt": prompt_messages(r), "prediction": p,
                               "reference": reference(r)} for r, p in zip(records, preds)])
    return preds


def score_variants(preds: dict[str, list[str]], refs: list[str], lang: str, cosine: bool,
                   embedding_model: str | None) -> dict[str, dict]:
    from phyassist.evaluate.metrics import text_metrics

    return {name: text_metrics(p, refs, lang, embedding_model=embedding_model, cosine=cosine)
            for name, p in preds.items()}


def reward_note(reason: str) -> str:
    return f"**Reward-model score: not computed**: {reason}."


def metrics_markdown(title: str, scores: dict[str, dict], n: int, reward_missing: str | None = None) -> str:
    keys = [k for k in LABELS if k in next(iter(scores.values()))]
    lines = [f"# {title}", "", f"{n} held-out samples.", "",
             "| model | " + " | ".join(LABELS[k] for k in keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[k]:.4g}" for k in keys) + " |")
    if reward_missing:
        lines += ["", reward_note(reward_missing)]
    return "\n".join(lines) + "\n"


def run_variants(cfg, load, records: list[dict], names: list[str]) -> dict[str, list[str]]:
    """Each variant's answers, generated only where ``predict/<variant>.jsonl`` does not hold them yet.

    ``load()`` -> (model, tokenizer, name -> context manager factory that sets the adapters for that
    name); it is called only when some variant is missing, so a finished run loads no model."""
    out = step_dir(cfg, "predict")
    preds = {name: finished_predictions(out / f"{safe(name)}.jsonl", records) for name in names}
    todo = [name for name, p in preds.items() if p is None]
    if not todo:
        print(f"[recipe] predict: predictions of {', '.join(names)} exist in {out}; nothing generated",
              flush=True)
        return preds
    model, tok, setups = load()
    for name in todo:
        with setups[name]():
            preds[name] = generate_variant(model, tok, records, out / f"{safe(name)}.jsonl", cfg.recipe.predict, name)
    del model, setups
    free_accelerator_memory()
    return preds


def safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def finish(cfg, title: str, records: list[dict], preds: dict[str, list[str]], cosine: bool,
           rewards: dict[str, list[float]] | None = None, reward_missing: str | None = None) -> dict:
    refs = [reference(r) for r in records]
    scores = score_variants(preds, refs, cfg.recipe.lang, cosine, cfg.recipe.predict.embedding_model)
    for name in scores if rewards else ():
        scores[name]["reward"] = round(sum(rewards[name]) / len(rewards[name]), 4)
        scores[name]["reward_ref"] = round(sum(rewards["reference"]) / len(rewards["reference"]), 4)
    out = step_dir(cfg, "predict")
    atomic_write_json(out / "metrics.json", scores)
    atomic_write_text(out / "metrics.md", metrics_markdown(title, scores, len(records), reward_missing))
    return scores


def reward_scores(cfg, reward_adapter, records: list[dict], preds: dict[str, list[str]]) -> dict[str, list[float]]:
    """The reward model's score of every answer (each variant's and the reference), in context.

    All answers go through ONE batched pass (:func:`~phyassist.recipes.reward.score`: batches of
    ``recipe.reward.per_device_eval_batch_size`` on the model's device, no autograd, a progress bar).
    Scores are cached in ``predict/rewards.json`` per answer set, tied to the reward adapter's weights,
    so a resumed run scores only what changed (and loads no reward model when nothing did)."""
    from phyassist.recipes.reward import load_reward_model, score

    rc, path = cfg.recipe.reward, step_dir(cfg, "predict") / "rewards.json"
    answers = {**preds, "reference": [reference(rec) for rec in records]}
    adapter = adapter_fingerprint(reward_adapter)
    keys = {name: text_key([rec["id"] for rec in records], texts, rc.max_length) for name, texts in answers.items()}
    cache = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    cached = cache.get("variants", {}) if cache.get("adapter") == adapter else {}
    out = {name: cached[name]["scores"] for name in answers
           if name in cached and cached[name].get("key") == keys[name]}
    todo = [name for name in answers if name not in out]
    if not todo:
        print(f"[recipe] predict: reward scores read from {path}", flush=True)
        return out
    convs = [prompt_messages(rec) + [{"role": "assistant", "content": a}]
             for name in todo for rec, a in zip(records, answers[name])]
    model, tok = load_reward_model(cfg, reward_adapter)
    print(f"[recipe] predict: scoring {len(convs)} answers ({', '.join(todo)}) with the reward model on "
          f"{model.device}, batches of {rc.per_device_eval_batch_size}", flush=True)
    flat = score(model, tok, convs, rc.per_device_eval_batch_size, rc.max_length, desc="reward scores")
    del model
    free_accelerator_memory()
    for k, name in enumerate(todo):
        out[name] = flat[k * len(records):(k + 1) * len(records)]
    atomic_write_json(path, {"adapter": adapter, "variants": {name: {"key": keys[name], "scores": out[name]}
                                                               for name in answers}})
    return {name: out[name] for name in answers}


def per_example_stats(preds: list[str], refs: list[str], rewards: list[float] | None, lang: str) -> dict:
    """name -> ((n, k) statistics, score function) for the bootstrap: corpus BLEU from sentence
    statistics, means of ROUGE, length and reward."""
    import numpy as np

    from phyassist.evaluate.metrics import text_length
    from phyassist.recipes.bootstrap import bleu_score, bleu_stats, mean_score, mean_stats, rouge_per_example

    out = {"bleu": (bleu_stats(preds, refs, lang), bleu_score)}
    out.update({k: (mean_stats(v), mean_score) for k, v in rouge_per_example(preds, refs, lang).items()})
    if rewards is not None:
        out["reward"] = (mean_stats(rewards), mean_score)
    out["mean_length"] = (mean_stats(np.array([text_length(p, lang) for p in preds])), mean_score)
    return out


INTERVAL_LABELS = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                   "reward": "reward-model score", "mean_length": "mean length"}


def intervals(records: list[dict], preds: dict[str, list[str]], rewards: dict[str, list[float]] | None,
              lang: str, seed: int, reward_missing: str | None = None) -> dict:
    """Every metric of every variant with a 95 % bootstrap interval over test dialogues, and the
    paired difference last variant − first (SFT+RL − SFT)."""
    from phyassist.recipes.bootstrap import interval, paired_interval
    from phyassist.recipes.dialogues import dialogue_key

    refs, groups = [reference(r) for r in records], [dialogue_key(r) for r in records]
    stats = {name: per_example_stats(p, refs, rewards and rewards[name], lang) for name, p in preds.items()}
    first, last = list(preds)[0], list(preds)[-1]
    table = {}
    for metric in stats[first]:
        row = {name: interval(stats[name][metric][0], stats[name][metric][1], groups, seed=seed) for name in preds}
        if len(preds) > 1:
            row[f"{last} − {first}"] = paired_interval(stats[first][metric][0], stats[last][metric][0],
                                                        stats[first][metric][1], groups, seed=seed)
        table[metric] = row
    ref_stats = per_example_stats(refs, refs, rewards and rewards["reference"], lang)
    for metric in ("reward", "mean_length"):
        if metric in table:
            table[metric]["reference"] = interval(ref_stats[metric][0], ref_stats[metric][1], groups, seed=seed)
    out = {"n": len(records), "dialogues": len(set(groups)), "level": 0.95, "metrics": table}
    if reward_missing:
        out["reward_not_computed"] = reward_missing
    return out


def intervals_markdown(title: str, iv: dict) -> str:
    from phyassist.recipes.bootstrap import formatted

    cols = list(dict.fromkeys(c for row in iv["metrics"].values() for c in row))
    lines = [f"# {title}", "", f"{iv['n']} test samples from {iv['dialogues']} dialogues; value [95 % bootstrap "
             "interval over dialogues]. `SFT+RL − SFT` is the paired difference; `reference` scores the doctor's "
             "replies.", "",
             "| metric | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for metric, row in iv["metrics"].items():
        lines.append(f"| {INTERVAL_LABELS.get(metric, metric)} | " +
                     " | ".join(formatted(row[c]) if c in row else "" for c in cols) + " |")
    if iv.get("reward_not_computed"):
        lines += ["", reward_note(iv["reward_not_computed"])]
    return "\n".join(lines) + "\n"


def side_by_side(records: list[dict], preds: dict[str, list[str]], rewards: dict[str, list[float]] | None,
                 k: int, seed: int, max_chars: int = 300) -> str:
    """A few test samples (seeded): the patient's last turn, the doctor's reply and each model's."""
    import random

    picks = sorted(random.Random(seed).sample(range(len(records)), min(k, len(records))))
    lines = ["# Side-by-side answers (test split)", ""]
    for i in picks:
        rec = records[i]
        patient = prompt_messages(rec)[-1]["content"][:max_chars]
        lines += [f"## {rec['id']}", "", f"**Patient** (last turn): {patient}", ""]
        answers = {"reference (doctor)": ("reference", reference(rec))} | {n: (n, p[i]) for n, p in preds.items()}
        for label, (name, text) in answers.items():
            rm = f" (reward {rewards[name][i]:.2f})" if rewards else ""
            lines += [f"* **{label}**{rm}: {text[:max_chars]}"]
        lines.append("")
    return "\n".join(lines)


def predict_covid(cfg, records: list[dict], sft_adapter, rl_adapter, reward_adapter=None) -> dict:
    """SFT vs SFT + RL (stacked) on the test split: BLEU, ROUGE, reward-model score, mean length,
    each with a bootstrap interval; length plot; a few answers side by side."""
    from phyassist.models.inference import activate, load_for_inference
    from phyassist.recipes.plots import plot_bars

    def load():
        model, tok = load_for_inference(cfg, [sft_adapter, rl_adapter])
        names = list(model.peft_config)
        return model, tok, {"SFT": lambda: _active(model, activate, names[:1]),
                            "SFT+RL": lambda: _active(model, activate, names)}

    records = held_out(cfg, records)
    preds = run_variants(cfg, load, records, ["SFT", "SFT+RL"])
    rewards = None
    missing = ("no reward adapter configured" if reward_adapter is None
               else adapter_problem(reward_adapter, "reward adapter"))
    if missing is None:
        rewards = reward_scores(cfg, reward_adapter, records, preds)
    else:
        print(f"[recipe] predict: reward-model score NOT computed: {missing}. BLEU, ROUGE and mean length "
              f"(with intervals) are written without it.", flush=True)
    scores = finish(cfg, "Recipe B: SFT vs SFT + RL on the test split", records, preds, cosine=False, rewards=rewards,
                    reward_missing=missing)
    out, pc = step_dir(cfg, "predict"), cfg.recipe.predict
    iv = intervals(records, preds, rewards, cfg.recipe.lang, cfg.seed, missing)
    atomic_write_json(out / "intervals.json", iv)
    atomic_write_text(out / "intervals.md", intervals_markdown("Recipe B: SFT vs SFT + RL, test split", iv))
    if pc.side_by_side:
        atomic_write_text(out / "side_by_side.md", side_by_side(records, preds, rewards, pc.side_by_side, cfg.seed))
    plot_bars({k: v["mean_length"] for k, v in scores.items()} | {"reference": scores["SFT"]["mean_length_ref"]},
              "Mean answer length on the test split", images_dir(cfg) / "covid_length.png", "characters")
    return scores


def evaluate_soulchat(cfg, records: list[dict], adapter) -> dict:
    """Base vs fine-tuned on the same held-out questions: BLEU, cosine, ROUGE-1, length quality."""
    from phyassist.models.inference import load_for_inference
    from phyassist.recipes.plots import plot_grouped

    def load():
        model, tok = load_for_inference(cfg, [adapter])
        return model, tok, {"base": model.disable_adapter, "fine-tuned": contextlib.nullcontext}

    records = held_out(cfg, records)
    names = (["base"] if cfg.recipe.predict.compare_base else []) + ["fine-tuned"]
    preds = run_variants(cfg, load, records, names)
    scores = finish(cfg, "Recipe A: base vs fine-tuned on held-out questions", records, preds, cosine=True)
    table = {"BLEU/100": {m: s["bleu"] / 100 for m, s in scores.items()},
             "cosine": {m: s["cosine"] for m, s in scores.items()},
             "ROUGE-1/100": {m: s["rouge1"] / 100 for m, s in scores.items()},
             "length quality": {m: s["length_quality"] for m, s in scores.items()}}
    plot_grouped(table, "Base vs fine-tuned (held-out questions)", images_dir(cfg) / "soulchat_metrics.png")
    return scores


@contextlib.contextmanager
def _active(model, activate, names):
    activate(model, names)
    yield
