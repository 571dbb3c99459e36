"""Preference pairs built from the recipe's own dialogues: the real reply is ``chosen``, a reply
constructed from it (or from another dialogue) is ``rejected``. No download and no labeller, so
recipe B's reward model learns something on any dialogue set a student points it at.

What each construction teaches the reward model (:data:`CONSTRUCTIONS`):

* ``other_patient``: a real reply to a DIFFERENT patient, of about the same length. Both are fluent
  doctor text, so only fitting this patient's words separates them (relevance).
* ``truncated``: the reply cut off after 30-70 % of it (``preference.truncate_range``): a finished
  answer beats one that stops mid-way (completeness). Shorter by construction.
* ``off_topic_tail``: the reply followed by a reply to a different patient: text that does not
  belong to this patient makes an answer worse (concision). LONGER by construction, so it cancels
  ``truncated``'s length cue: "longer is better" scores 0 on these pairs.
* ``spliced``: the reply's first half joined to the second half of another patient's reply, with
  the same length as the real one: the answer must stay on this patient to the end (coherence).
* ``sft_sample`` (optional, not in the default list): the SFT model's own reply to the same prompt
  (greedy or sampled), generated in the reward step (:mod:`.sft_samples`). The reward model learns to
  prefer the real doctor over the current policy: the signal RL needs. Caveat: the SFT reply may be
  as good as the real one (noisy labels), and its length is whatever the model writes, so the
  report's "chosen longer" column must be checked for a length cue. No donor: the reply comes from
  the model (trained on the train split) answering this split's own prompt.

The constructions are assigned round-robin over a seeded shuffle of the replies, so they come in
equal shares and a length-only scorer sits near chance overall (the reward step measures it).
Donor replies come from other dialogues of the SAME split: a test pair holds test text only.
Lengths are measured as the kit's metrics do (characters for Chinese, words for English), and
cuts fall between characters (Chinese) or words (English).
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from pathlib import Path

from phyassist.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from phyassist.recipes.dialogues import dialogue_key, turn_samples

CONSTRUCTIONS = {
    "other_patient": "a real reply to a different patient, length-matched: relevance to this patient",
    "truncated": "the reply cut off part-way: completeness (shorter by construction)",
    "off_topic_tail": "the reply plus another patient's reply: no off-topic filler (longer by construction)",
    "spliced": "first half of the reply + second half of another patient's, same length: coherence",
    "sft_sample": "the SFT model's own reply to this prompt: prefer the real doctor over the current policy "
                  "(the signal RL needs; check the length column)",
}
SPLICE_RANGE = (0.4, 0.6)
DONOR_TRIES = 20


def units(text: str, lang: str) -> list[str]:
    """Characters (Chinese) or whitespace-separated words (English): where a cut may fall."""
    return text.split() if lang == "en" else list(text)


def join(parts: list[str], lang: str) -> str:
    return (" " if lang == "en" else "").join(parts).strip()


def length(text: str, lang: str) -> int:
    """The metrics' length (words / non-space characters); the length baseline compares these."""
    from phyassist.evaluate.metrics import text_length

    return text_length(text, lang)


def candidates(records: list[dict], expand_turns: bool, min_reply_chars: int,
               max_prompt_chars: int | None) -> list[dict]:
    """``{prompt, reply, dialogue}`` per assistant turn usable as ``chosen``.

    ``expand_turns``: records are whole conversations (recipe A): each assistant turn becomes a
    candidate with the earlier turns as its prompt."""
    samples = [s for r in records for s in (turn_samples(r) if expand_turns else [r])]
    out = []
    for s in samples:
        msgs = s["messages"]
        if msgs[-1]["role"] != "assistant" or len(msgs[-1]["content"]) < min_reply_chars:
            continue
        prompt = msgs[:-1]
        if max_prompt_chars and sum(len(m["content"]) for m in prompt) > max_prompt_chars:
            continue
        out.append({"prompt": prompt, "reply": msgs[-1]["content"], "dialogue": dialogue_key(s),
                    "key": f"{s.get('source', '')}:{s['id']}"})
    return out


class DonorPool:
    """The split's replies sorted by length, to draw a reply of another dialogue near a length."""

    def __init__(self, cands: list[dict], lang: str):
        ranked = sorted(cands, key=lambda c: length(c["reply"], lang))
        self.items, self.lengths = ranked, [length(c["reply"], lang) for c in ranked]

    def pick(self, cand: dict, target: int, tolerance: float, rng: random.Random) -> dict | None:
        """A reply of another dialogue whose length is within ``tolerance`` of ``target`` (None: none)."""
        lo = bisect.bisect_left(self.lengths, target * (1 - tolerance))
        hi = bisect.bisect_right(self.lengths, target * (1 + tolerance))
        if hi <= lo:
            return None
        for _ in range(DONOR_TRIES):
            d = self.items[rng.randrange(lo, hi)]
            if d["dialogue"] != cand["dialogue"] and d["reply"] != cand["reply"]:
                return d
        return None


def truncated(cand: dict, pool: DonorPool, pcfg, lang: str, rng: random.Random):
    parts = units(cand["reply"], lang)
    keep = min(len(parts) - 1, max(1, round(rng.uniform(*pcfg.truncate_range) * len(parts))))
    return (join(parts[:keep], lang), None) if keep >= 1 else None


def other_patient(cand: dict, pool: DonorPool, pcfg, lang: str, rng: random.Random):
    donor = pool.pick(cand, length(cand["reply"], lang), pcfg.length_tolerance, rng)
    return (donor["reply"], donor["dialogue"]) if donor else None


def off_topic_tail(cand: dict, pool: DonorPool, pcfg, lang: str, rng: random.Random):
    donor = pool.pick(cand, length(cand["reply"], lang), pcfg.length_tolerance, rng)
    return (join([cand["reply"], donor["reply"]], lang), donor["dialogue"]) if donor else None


def spliced(cand: dict, pool: DonorPool, pcfg, lang: str, rng: random.Random):
    parts = units(cand["reply"], lang)
    donor = pool.pick(cand, length(cand["reply"], lang), pcfg.length_tolerance, rng)
    if donor is None or len(parts) < 2:
        return None
    head = max(1, round(rng.uniform(*SPLICE_RANGE) * len(parts)))
    tail = units(donor["reply"], lang)[-(len(parts) - head):]
    return join(parts[:head] + tail, lang), donor["dialogue"]


MAKERS = {"other_patient": other_patient, "truncated": truncated, "off_topic_tail": off_topic_tail,
          "spliced": spliced}
GENERATED = ("sft_sample",)  # made by a model (:mod:`.sft_samples`), not from the dialogues


def assignments(cands: list[dict], split: str, pcfg, seed: int) -> tuple[list[tuple[int, str]], random.Random]:
    """(candidate index, construction) in build order: round-robin over a seeded shuffle; and the
    random generator the constructions then draw from."""
    rng = random.Random(f"{seed}:{split}")
    order = list(range(len(cands)))
    rng.shuffle(order)
    names = list(pcfg.constructions)
    return [(i, names[(rank + j) % len(names)]) for rank, i in enumerate(order)
            for j in range(pcfg.pairs_per_sample)], rng


def generation_requests(records: list[dict], split: str, pcfg, seed: int,
                        expand_turns: bool = False) -> list[dict]:
    """The candidates (``{prompt, reply, dialogue, key}``) that :func:`build_pairs` will give an
    ``sft_sample`` construction: the prompts whose SFT reply must be generated first."""
    if not set(GENERATED) & set(pcfg.constructions):
        return []
    cands = candidates(records, expand_turns, pcfg.min_reply_chars, pcfg.max_prompt_chars)
    plan, _ = assignments(cands, split, pcfg, seed)
    return [cands[i] for i, name in plan if name in GENERATED]


def pair_record(cand: dict, rejected: str, construction: str, donor: str | None, split: str) -> dict:
    """TRL's conversational preference layout plus where the pair came from."""
    return {"prompt": cand["prompt"], "chosen": [{"role": "assistant", "content": cand["reply"]}],
            "rejected": [{"role": "assistant", "content": rejected}], "construction": construction,
            "dialogue": cand["dialogue"], "donor": donor, "split": split}


def build_pairs(records: list[dict], split: str, pcfg, lang: str, seed: int, expand_turns: bool = False,
                generated: dict[str, str] | None = None) -> tuple[list[dict], dict[str, int]]:
    """(pairs, skipped per construction) for one split; seeded, so a rebuild gives the same pairs.

    ``generated``: candidate key -> the SFT model's reply (``sft_sample``); a candidate without one
    (no SFT adapter, or not generated) is skipped, as is a reply equal to the real one."""
    cands = candidates(records, expand_turns, pcfg.min_reply_chars, pcfg.max_prompt_chars)
    pool = DonorPool(cands, lang)
    plan, rng = assignments(cands, split, pcfg, seed)
    pairs, skipped = [], Counter()
    for i, name in plan:
        if name in GENERATED:
            text = (generated or {}).get(cands[i]["key"])
            made = (text, None) if text else None
        else:
            made = MAKERS[name](cands[i], pool, pcfg, lang, rng)
        if made is None or not made[0] or made[0] == cands[i]["reply"]:
            skipped[name] += 1
            continue
        pairs.append(pair_record(cands[i], made[0], name, made[1], split))
    return pairs, dict(skipped)


def construction_stats(pairs: list[dict], lang: str) -> dict[str, dict]:
    """Per construction: pairs, mean chosen/rejected length, and how often the chosen is longer
    (what a "longer is better" scorer gets right)."""
    out = {}
    for name in dict.fromkeys(p["construction"] for p in pairs):
        sub = [p for p in pairs if p["construction"] == name]
        lc = [length(p["chosen"][0]["content"], lang) for p in sub]
        lr = [length(p["rejected"][0]["content"], lang) for p in sub]
        out[name] = {"pairs": len(sub), "chosen_length": round(sum(lc) / len(sub), 2),
                     "rejected_length": round(sum(lr) / len(sub), 2),
                     "chosen_longer": round(sum((a > b) + 0.5 * (a == b) for a, b in zip(lc, lr)) / len(sub), 4)}
    return out


def report_markdown(report: dict) -> str:
    lines = ["# Preference pairs built from the recipe's dialogues", "",
             "Chosen: the real reply. Rejected: see the constructions below (phyassist/recipes/pairs.py). "
             "`chosen longer` is the accuracy a length-only scorer (\"longer is better\") would get.", "",
             "| split | construction | pairs | skipped | chosen length | rejected length | chosen longer |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for split, r in report["splits"].items():
        for name, s in r["constructions"].items():
            lines.append(f"| {split} | {name} | {s['pairs']} | {r['skipped'].get(name, 0)} | {s['chosen_length']} | "
                         f"{s['rejected_length']} | {s['chosen_longer']} |")
        longer = "-" if r["chosen_longer"] is None else r["chosen_longer"]
        lines.append(f"| {split} | **all** | {r['pairs']} | {sum(r['skipped'].values())} | | | {longer} |")
    lines += [f"\nNote: {n}." for n in report.get("notes", [])]
    lines += ["", "| construction | what it teaches |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in CONSTRUCTIONS.items() if k in report["constructions"]]
    return "\n".join(lines) + "\n"


def pairs_dir(cfg) -> Path:
    return cfg.out / "preference"


def build_preference_splits(cfg, splits: dict[str, list[dict]], generated: dict[str, str] | None = None,
                            notes: list[str] | None = None) -> dict[str, list[dict]]:
    """Pairs for every split of the data step (train, val, test ...); writes them with a report
    under ``<out>/preference`` and checks no dialogue appears in two splits' pairs.
    ``generated``: the SFT model's replies for ``sft_sample`` (:func:`phyassist.recipes.sft_samples.sft_samples`)."""
    p, lang, expand = cfg.recipe.preference, cfg.recipe.lang, cfg.recipe.data.unit == "conversation"
    built, report = {}, {"constructions": list(p.constructions), "splits": {}, "notes": list(notes or [])}
    for split, records in splits.items():
        pairs, skipped = build_pairs(records, split, p, lang, cfg.seed, expand, generated)
        built[split] = pairs
        stats = construction_stats(pairs, lang) if pairs else {}
        longer = sum(s["chosen_longer"] * s["pairs"] for s in stats.values()) / len(pairs) if pairs else None
        report["splits"][split] = {"pairs": len(pairs), "skipped": skipped, "constructions": stats,
                                   "chosen_longer": None if longer is None else round(longer, 4)}
    check_disjoint(built)
    out = pairs_dir(cfg)
    for split, pairs in built.items():
        atomic_write_jsonl(out / f"{split}.jsonl", pairs)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    return built


def check_disjoint(built: dict[str, list[dict]]) -> None:
    """No dialogue (as prompt or as donor of a rejected reply) in the pairs of two splits."""
    seen: dict[str, str] = {}
    for split, pairs in built.items():
        for key in {k for p in pairs for k in (p["dialogue"], p["donor"]) if k}:
            if seen.setdefault(key, split) != split:
                raise ValueError(f"dialogue {key} has preference pairs in both {seen[key]} and {split}: "
                                 f"the data splits share a dialogue")
