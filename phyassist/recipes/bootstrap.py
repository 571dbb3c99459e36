"""Bootstrap intervals for the recipes' scores: corpus BLEU, mean ROUGE, mean length, mean reward,
pairwise accuracy, and the paired difference of two models on the same samples.

Every score here is a function of SUMS of per-example statistics (BLEU: n-gram matches and
totals; a mean: value and count). A resample is then a vector of example counts, and its sums
are one matrix product, so 1,000 resamples of corpus BLEU cost milliseconds. With ``groups``
(the dialogue of each sample) whole dialogues are resampled: a dialogue's doctor turns share
their history, so they are not independent, and resampling single turns would give too narrow
an interval. Percentile intervals; the same seed gives the same interval.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

REPS = 1000
LEVEL = 0.95


def group_sums(stats: np.ndarray, groups: Sequence | None) -> np.ndarray:
    """Per-example statistics summed per group (rows in order of first appearance)."""
    if groups is None:
        return stats
    if len(groups) != len(stats):
        raise ValueError(f"bootstrap: {len(groups)} groups for {len(stats)} examples")
    keys = list(dict.fromkeys(groups))
    index = {k: i for i, k in enumerate(keys)}
    out = np.zeros((len(keys), stats.shape[1]))
    np.add.at(out, [index[g] for g in groups], stats)
    return out


def resample_counts(n: int, reps: int, seed: int) -> np.ndarray:
    """(reps, n): how often each unit is drawn in each resample of n units with replacement."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(reps)])


def _check(stats) -> np.ndarray:
    stats = np.asarray(stats, dtype=float)
    if stats.ndim != 2 or not len(stats):
        raise ValueError("bootstrap: need a non-empty (examples, statistics) array")
    return stats


def interval(stats, score: Callable[[np.ndarray], float], groups: Sequence | None = None, reps: int = REPS,
             seed: int = 0, level: float = LEVEL) -> dict:
    """``{"value", "low", "high"}``: ``score`` of the summed statistics and its percentile interval."""
    units = group_sums(_check(stats), groups)
    sums = resample_counts(len(units), reps, seed) @ units
    return summary(score(units.sum(axis=0)), [score(s) for s in sums], level)


def paired_interval(stats_a, stats_b, score: Callable[[np.ndarray], float], groups: Sequence | None = None,
                    reps: int = REPS, seed: int = 0, level: float = LEVEL) -> dict:
    """``score(b) - score(a)`` on the same examples, each resample drawn once for both."""
    a, b = group_sums(_check(stats_a), groups), group_sums(_check(stats_b), groups)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired bootstrap: {a.shape[0]} vs {b.shape[0]} examples")
    counts = resample_counts(len(a), reps, seed)
    diffs = [score(sb) - score(sa) for sa, sb in zip(counts @ a, counts @ b)]
    return summary(score(b.sum(axis=0)) - score(a.sum(axis=0)), diffs, level)


def summary(value: float, resampled: list[float], level: float) -> dict:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return {"value": round(float(value), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def mean_stats(values: Sequence[float]) -> np.ndarray:
    """(n, 2): value and count, for :func:`mean_score`."""
    v = np.asarray(values, dtype=float)
    return np.column_stack([v, np.ones_like(v)])


def mean_score(sums: np.ndarray) -> float:
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


def bleu_stats(preds: Sequence[str], refs: Sequence[str], lang: str) -> np.ndarray:
    """(n, 10) sacrebleu sufficient statistics per sentence (``zh`` tokenizer for Chinese), the
    ones :func:`phyassist.evaluate.metrics.bleu` sums over the corpus."""
    from sacrebleu.metrics import BLEU

    from phyassist.evaluate.metrics import check_pairs

    check_pairs(preds, refs)
    metric = BLEU(tokenize="zh" if lang == "zh" else "13a")
    return np.asarray(metric._extract_corpus_statistics(list(preds), [list(refs)]), dtype=float)


def bleu_score(sums: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed statistics, exactly as sacrebleu computes it."""
    from sacrebleu.metrics import BLEU

    return float(BLEU(tokenize="none")._compute_score_from_stats([int(round(x)) for x in sums]).score)


def rouge_per_example(preds: Sequence[str], refs: Sequence[str], lang: str,
                      zh_tokenizer: str = "char") -> dict[str, np.ndarray]:
    """ROUGE-1/2/L F-measure ×100 per example, tokenized as :func:`phyassist.evaluate.metrics.rouge`
    does (characters or jieba words for Chinese; its mean is that function's value)."""
    from rouge_score import rouge_scorer

    from phyassist.evaluate.metrics import check_pairs, tokens

    check_pairs(preds, refs)
    kinds = ["rouge1", "rouge2", "rougeL"]

    class Tokenizer:
        def tokenize(self, text):
            return tokens(text, lang, zh_tokenizer)

    scorer = (rouge_scorer.RougeScorer(kinds, use_stemmer=True) if lang == "en"
              else rouge_scorer.RougeScorer(kinds, tokenizer=Tokenizer()))
    rows = [scorer.score(r or "", p or "") for p, r in zip(preds, refs)]
    return {k: np.array([100 * s[k].fmeasure for s in rows]) for k in kinds}


def correct_pairs(chosen: Sequence[float], rejected: Sequence[float]) -> np.ndarray:
    """1 where chosen scores above rejected, 0.5 on a tie, 0 else: pairwise accuracy per pair."""
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    return (c > r) + 0.5 * (c == r)


def formatted(iv: dict, digits: int = 2) -> str:
    return f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"
