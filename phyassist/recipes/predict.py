"""Generate on a recipe's held-out samples with several adapter set-ups of ONE loaded model and
score them against the reference answers (the kit's metrics, Chinese tokenization).

Recipe A compares the base (adapters disabled) with the fine-tuned model; recipe B compares the
SFT adapter alone with SFT + RL stacked, and plots the mean answer length of each (the case
study's observation: RL made answers longer). Each variant's predictions are written as soon as
it finishes, so a rerun after a crash only generates what is missing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from phyassist.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from phyassist.recipes.common import images_dir, step_dir
from phyassist.recipes.dialogues import prompt_messages, reference, seeded_cap

LABELS = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "cosine": "cosine",
          "length_quality": "length quality", "mean_length": "mean length (chars)",
          "mean_length_ref": "reference length (chars)"}


def held_out(cfg, records: list[dict]) -> list[dict]:
    return seeded_cap(records, cfg.recipe.predict.max_examples, cfg.seed)


def chat_prompts(tok, records: list[dict]) -> list[str]:
    return [tok.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
            for r in records]


def generate_variant(model, tok, records: list[dict], path: Path, pcfg, desc: str) -> list[str]:
    """Answers for ``records`` (read back from ``path`` when a previous run finished them)."""
    from phyassist.evaluate.generate import generate_batched

    if path.exists():
        done = read_jsonl(path)
        if [d["id"] for d in done] == [r["id"] for r in records]:
            return [d["prediction"] for d in done]
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


def metrics_markdown(title: str, scores: dict[str, dict], n: int) -> str:
    keys = [k for k in LABELS if k in next(iter(scores.values()))]
    lines = [f"# {title}", "", f"{n} held-out samples.", "",
             "| model | " + " | ".join(LABELS[k] for k in keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def run_variants(cfg, model, tok, records: list[dict], variants: dict) -> dict[str, list[str]]:
    """``variants``: name -> context manager factory that sets the adapters for that name."""
    out = step_dir(cfg, "predict")
    preds = {}
    for name, setup in variants.items():
        with setup():
            preds[name] = generate_variant(model, tok, records, out / f"{safe(name)}.jsonl", cfg.recipe.predict, name)
    return preds


def safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def finish(cfg, title: str, records: list[dict], preds: dict[str, list[str]], cosine: bool) -> dict:
    refs = [reference(r) for r in records]
    scores = score_variants(preds, refs, cfg.recipe.lang, cosine, cfg.recipe.predict.embedding_model)
    out = step_dir(cfg, "predict")
    atomic_write_json(out / "metrics.json", scores)
    atomic_write_text(out / "metrics.md", metrics_markdown(title, scores, len(records)))
    return scores


def predict_covid(cfg, records: list[dict], sft_adapter, rl_adapter) -> dict:
    """SFT vs SFT + RL (stacked) on the test split: BLEU, ROUGE, mean length; length plot."""
    from phyassist.models.inference import activate, load_for_inference
    from phyassist.recipes.plots import plot_bars

    model, tok = load_for_inference(cfg, [sft_adapter, rl_adapter])
    names = list(model.peft_config)
    records = held_out(cfg, records)
    preds = run_variants(cfg, model, tok, records, {
        "SFT": lambda: _active(model, activate, names[:1]),
        "SFT+RL": lambda: _active(model, activate, names)})
    scores = finish(cfg, "Recipe B: SFT vs SFT + RL on the test split", records, preds, cosine=False)
    plot_bars({k: v["mean_length"] for k, v in scores.items()} | {"reference": scores["SFT"]["mean_length_ref"]},
              "Mean answer length on the test split", images_dir(cfg) / "covid_length.png", "characters")
    return scores


def evaluate_soulchat(cfg, records: list[dict], adapter) -> dict:
    """Base vs fine-tuned on the same held-out questions: BLEU, cosine, ROUGE-1, length quality."""
    from phyassist.models.inference import load_for_inference
    from phyassist.recipes.plots import plot_grouped

    model, tok = load_for_inference(cfg, [adapter])
    records = held_out(cfg, records)
    variants = {"fine-tuned": contextlib.nullcontext}
    if cfg.recipe.predict.compare_base:
        variants = {"base": model.disable_adapter, **variants}
    preds = run_variants(cfg, model, tok, records, variants)
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
