"""How good is the reward model? Pairwise accuracy on held-out preference pairs (the share where
the real reply scores above the rejected one), with a bootstrap interval, next to chance (0.5) and
next to a length-only scorer ("longer is better").

A reward model that only learned length would match the length scorer everywhere; the report
catches it on two views: the difference of the two accuracies (paired interval), and the
accuracy on the pairs whose rejected reply is at least as long as the chosen one, where "longer
is better" is right at most half the time (ties) by construction. Per construction too.
"""

from __future__ import annotations

from pathlib import Path

from phyassist.io import atomic_write_json, atomic_write_text
from phyassist.recipes.bootstrap import correct_pairs, formatted, interval, mean_stats, mean_score, paired_interval


def pair_texts(pair: dict) -> tuple[str, str]:
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


def length_scores(pairs: list[dict], lang: str) -> tuple[list[int], list[int]]:
    """The length-only scorer: each reply's length (characters for Chinese, words for English)."""
    from phyassist.recipes.pairs import length

    lens = [tuple(length(t, lang) for t in pair_texts(p)) for p in pairs]
    return [a for a, _ in lens], [b for _, b in lens]


def accuracy_block(rm_correct, len_correct, groups, seed: int) -> dict:
    rm, ln = mean_stats(rm_correct), mean_stats(len_correct)
    return {"pairs": len(rm_correct), "reward_model": interval(rm, mean_score, groups, seed=seed),
            "length_baseline": interval(ln, mean_score, groups, seed=seed),
            "reward_model_minus_length": paired_interval(ln, rm, mean_score, groups, seed=seed)}


def accuracy_report(pairs: list[dict], chosen_scores, rejected_scores, lang: str, seed: int = 0) -> dict:
    """Overall, per construction, and on the length-adversarial pairs (rejected not shorter)."""
    if not pairs or len(pairs) != len(chosen_scores) or len(pairs) != len(rejected_scores):
        raise ValueError(f"reward evaluation: {len(pairs)} pairs, {len(chosen_scores)} chosen and "
                         f"{len(rejected_scores)} rejected scores")
    rm = correct_pairs(chosen_scores, rejected_scores)
    lc, lr = length_scores(pairs, lang)
    ln = correct_pairs(lc, lr)
    groups = [p.get("dialogue", i) for i, p in enumerate(pairs)]

    def block(idx):
        return accuracy_block(rm[idx], ln[idx], [groups[i] for i in idx], seed) if idx else None

    every = list(range(len(pairs)))
    kinds = dict.fromkeys(p.get("construction", "file") for p in pairs)
    report = {"chance": 0.5, "all": block(every),
              "rejected_not_shorter": block([i for i in every if lr[i] >= lc[i]]),
              "by_construction": {k: block([i for i in every if pairs[i].get("construction", "file") == k])
                                  for k in kinds},
              "mean_margin": round(float(sum(c - r for c, r in zip(chosen_scores, rejected_scores)) / len(pairs)), 4)}
    return report


def verdict(report: dict) -> str:
    """One sentence: above chance? beyond what length explains?"""
    a = report["all"]
    rm, diff = a["reward_model"], a["reward_model_minus_length"]
    above = ("above chance" if rm["low"] > 0.5 else "BELOW chance" if rm["high"] < 0.5 else
             "NOT distinguishable from chance")
    beyond = ("better than the length-only scorer" if diff["low"] > 0 else
              "worse than the length-only scorer" if diff["high"] < 0 else
              "not distinguishable from the length-only scorer")
    return f"pairwise accuracy {formatted(rm, 3)}: {above}, {beyond} (difference {formatted(diff, 3)})."


def report_markdown(report: dict, title: str = "Reward model on held-out preference pairs") -> str:
    lines = [f"# {title}", "", verdict(report), "",
             "Pairwise accuracy (chosen scored above rejected; ties count half), 95 % bootstrap intervals "
             "over dialogues. Chance is 0.5; the length baseline says \"the longer reply is better\".", "",
             "| pairs | n | reward model | length baseline | reward model − length |",
             "| --- | ---: | ---: | ---: | ---: |"]
    rows = [("all", report["all"]), ("rejected not shorter", report["rejected_not_shorter"])]
    rows += [(f"construction: {k}", v) for k, v in report["by_construction"].items()]
    for name, b in rows:
        if b:
            lines.append(f"| {name} | {b['pairs']} | {formatted(b['reward_model'], 3)} | "
                         f"{formatted(b['length_baseline'], 3)} | {formatted(b['reward_model_minus_length'], 3)} |")
    lines += ["", f"Mean score margin (chosen − rejected): {report['mean_margin']}."]
    return "\n".join(lines) + "\n"


def evaluate_reward(cfg, adapter_dir: str | Path, pairs: list[dict]) -> dict:
    """Score the held-out pairs with the trained reward model; writes ``<out>/reward/eval.json/.md``."""
    from phyassist.recipes.common import free_accelerator_memory, step_dir
    from phyassist.recipes.reward import load_reward_model, score

    out = step_dir(cfg, "reward")
    if not pairs:
        print("[recipe] reward: no held-out preference pairs; accuracy not measured", flush=True)
        return {}
    model, tok = load_reward_model(cfg, adapter_dir)
    r = cfg.recipe.reward
    convs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    scores = score(model, tok, convs, r.per_device_eval_batch_size, r.max_length, desc="reward model: held-out pairs")
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    del model
    free_accelerator_memory()
    report = accuracy_report(pairs, chosen, rejected, cfg.recipe.lang, cfg.seed)
    atomic_write_json(out / "eval.json", report)
    atomic_write_text(out / "eval.md", report_markdown(report))
    print(f"[recipe] reward model: {verdict(report)}", flush=True)
    return report
