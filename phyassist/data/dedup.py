"""Exact and near duplicates over the whole pool of sources, first occurrence kept.

Near duplicates: word 5-shingles of the normalised question+answer; MinHash signatures (numpy,
seeded, deterministic) banded into LSH buckets propose candidate pairs, and each candidate is
confirmed with the exact Jaccard similarity, so the threshold means what it says. CJK characters
count as words, so text in any script has shingles. ~15k rows take a few seconds on one core.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from phyassist.data.clean import Outcome
from phyassist.data.records import Removed, Row
from phyassist.data.sources import normalise

SHINGLE = 5
NUM_PERM = 128
_PRIME = (1 << 61) - 1
_MASK = (1 << 32) - 1
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def pair_key(r: Row) -> str:
    return normalise(r.question) + "\x00" + normalise(r.answer)


def drop_exact_duplicates(rows: list[Row]) -> Outcome:
    first: dict[str, Row] = {}
    kept, removed = [], []
    for r in rows:
        k = pair_key(r)
        if k in first:
            removed.append(Removed(r, "exact_duplicate", f"same as {first[k].origin} ({first[k].source})"))
        else:
            first[k] = r
            kept.append(r)
    return Outcome(kept, removed)


def shingles(text: str, k: int = SHINGLE, vocab: dict[str, int] | None = None) -> set[int]:
    """Hashed word k-grams of normalised text (a text shorter than k words is one shingle)."""
    vocab = {} if vocab is None else vocab
    ids = [vocab.setdefault(w, len(vocab)) for w in _WORD.findall(normalise(text))]
    if not ids:
        return set()
    grams = [tuple(ids[i:i + k]) for i in range(max(1, len(ids) - k + 1))]
    return {hash(g) & _MASK for g in grams}


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band whose S-curve midpoint stays well under
    the threshold, so true near duplicates are almost never missed."""
    best = (num_perm, 1)
    for r in (1, 2, 4, 8, 16, 32):
        b = num_perm // r
        if (1 / b) ** (1 / r) <= threshold - 0.1:
            best = (b, r)
    return best


def minhash(sh: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not sh:
        return np.full(len(a), _MASK, dtype=np.uint64)
    x = np.fromiter(sh, dtype=np.uint64, count=len(sh))
    return (((a[:, None] * x[None, :] + b[:, None]) % np.uint64(_PRIME)) & np.uint64(_MASK)).min(axis=1)


def drop_near_duplicates(rows: list[Row], threshold: float, seed: int = 0) -> Outcome:
    """Drop rows whose Jaccard similarity to an earlier kept row is >= ``threshold``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _MASK, size=NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, _MASK, size=NUM_PERM, dtype=np.uint64)
    n_bands, r = _bands(threshold, NUM_PERM)
    vocab: dict[str, int] = {}
    sets = [shingles(row.question + "\n" + row.answer, vocab=vocab) for row in rows]
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(n_bands)]
    kept, removed = [], []
    for i, row in enumerate(rows):
        sig = minhash(sets[i], a, b)
        keys = [sig[j * r:(j + 1) * r].tobytes() for j in range(n_bands)]
        candidates = {k for band, key in enumerate(keys) for k in buckets[band].get(key, ())}
        match = next((k for k in sorted(candidates) if jaccard(sets[i], sets[k]) >= threshold), None)
        if match is not None:
            sim = jaccard(sets[i], sets[match])
            removed.append(Removed(row, "near_duplicate",
                                   f"Jaccard {sim:.2f} with {rows[match].origin} ({rows[match].source})"))
            continue
        kept.append(row)
        for band, key in enumerate(keys):
            buckets[band][key].append(i)
    return Outcome(kept, removed)


# ------------------------------------------------------------------ train/test overlap that hides

_NOT_WORD = re.compile(r"[\W_]+")
CHAR_SHINGLE = 12


def canonical(text: str) -> str:
    """A comparison key that survives encoding and spacing tricks: mojibake repaired with ftfy
    ("can‚Äôt" -> "can't"), Unicode-normalised, case-folded, and every non-word character and
    space removed ("c a n ' t" and "can't" -> "cant"), so a post copied through a broken
    encoding or with its letters spaced apart keys the same as the original."""
    import unicodedata

    import ftfy

    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", ftfy.fix_text(str(text))).casefold())


def char_shingles(key: str, k: int = CHAR_SHINGLE) -> set[int]:
    """Hashed character k-grams of a canonical key (spaces are gone, so words are not units)."""
    if not key:
        return set()
    return {hash(key[i:i + k]) & _MASK for i in range(max(1, len(key) - k + 1))}


def cross_duplicates(train: list[str], test: list[str], threshold: float | None = 0.8,
                     seed: int = 0) -> list[tuple[int, int, float]]:
    """(train index, test index, similarity) of every training text that repeats a test text:
    the same canonical key (similarity 1.0), or character-shingle Jaccard >= ``threshold``
    (MinHash LSH proposes, exact Jaccard confirms; ``threshold=None``: canonical keys only, fast).
    Meant for posts: leakage checks compare the post inside each query, not the question wrapped
    around it."""
    test_keys = [canonical(t) for t in test]
    by_key: dict[str, list[int]] = defaultdict(list)
    for j, k in enumerate(test_keys):
        if k:
            by_key[k].append(j)
    if threshold is None:
        return [(i, j, 1.0) for i, text in enumerate(train) for j in by_key.get(canonical(text), [])]
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _MASK, size=NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, _MASK, size=NUM_PERM, dtype=np.uint64)
    n_bands, r = _bands(threshold, NUM_PERM)
    test_sh = [char_shingles(k) for k in test_keys]
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(n_bands)]
    for j, sh in enumerate(test_sh):
        if sh:
            sig = minhash(sh, a, b)
            for band in range(n_bands):
                buckets[band][sig[band * r:(band + 1) * r].tobytes()].append(j)
    out = []
    for i, text in enumerate(train):
        key = canonical(text)
        if not key:
            continue
        exact = by_key.get(key, [])
        out += [(i, j, 1.0) for j in exact]
        sh = char_shingles(key)
        sig = minhash(sh, a, b)
        cands = {j for band in range(n_bands) for j in buckets[band].get(sig[band * r:(band + 1) * r].tobytes(), ())}
        for j in sorted(cands - set(exact)):
            sim = jaccard(sh, test_sh[j])
            if sim >= threshold:
                out.append((i, j, round(sim, 4)))
    return out
