"""Seeded sampling, train/val splits by group, and the train/test leakage check."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

from phyassist.data.records import Removed, Row, snippet
from phyassist.data.sources import group_of, normalise, post_of


def seeded_order(rows: list[Row], seed: int, salt: str) -> list[Row]:
    """A permutation of ``rows`` that depends only on (seed, salt) and the rows' order."""
    order = list(rows)
    random.Random(f"{seed}:{salt}").shuffle(order)
    return order


def take(rows: list[Row], n: int | None, seed: int, salt: str,
         accept: Callable[[list[Row]], tuple[list, list[Removed]]]) -> tuple[list, list[Removed]]:
    """Walk a seeded order, passing batches to ``accept`` (which may reject rows, e.g. too many
    tokens) until ``n`` are accepted; result in file order. ``n=None``: every row."""
    order = seeded_order(rows, seed, salt) if n is not None else list(rows)
    want = len(order) if n is None else n
    accepted, removed, i = [], [], 0
    while len(accepted) < want and i < len(order):
        batch = order[i:i + (want - len(accepted))]
        i += len(batch)
        ok, rej = accept(batch)
        accepted.extend(ok)
        removed.extend(rej)
    rank = {r.origin: k for k, r in enumerate(rows)}
    accepted.sort(key=lambda rec: rank[rec["origin"]])
    return accepted, removed


def split_train_val(records: list[dict], groups: dict[str, str], val_fraction: float,
                    seed: int) -> tuple[list[dict], list[dict]]:
    """Per source, whole groups (same post / same question) go to val until ``val_fraction`` of
    the groups; a group never straddles train and val. ``groups``: origin -> group key."""
    if val_fraction <= 0:
        return list(records), []
    by_source: dict[str, dict[str, None]] = defaultdict(dict)
    for rec in records:
        by_source[rec["source"]][groups[rec["origin"]]] = None
    val_groups: set[str] = set()
    for source, gs in by_source.items():
        n_val = round(len(gs) * val_fraction)
        if n_val == 0 and len(gs) > 1:
            n_val = 1
        picked = list(gs)
        random.Random(f"{seed}:split:{source}").shuffle(picked)
        val_groups.update(picked[:n_val])
    train = [r for r in records if groups[r["origin"]] not in val_groups]
    val = [r for r in records if groups[r["origin"]] in val_groups]
    return train, val


def canonical_key(post: str) -> str:
    """A post's key through mojibake and spacing tricks (``dedup.canonical``), marked so that it
    never equals a normalised key; empty posts give no key."""
    from phyassist.data.dedup import canonical

    key = canonical(post)
    return f"canonical:{key}" if key else ""


def test_keys(rows: list[Row]) -> set[str]:
    """Normalised posts and questions of test items, and their posts' canonical keys (what a
    training row must not repeat)."""
    keys = {normalise(r.question) for r in rows} | {group_of(r) for r in rows}
    return (keys | {canonical_key(post_of(r.question)) for r in rows}) - {""}


def leakage(train: list[dict], tests: dict[str, list[Row]], examples: int = 3) -> dict:
    """Overlap of training questions/posts with each test set: exact text and normalised text."""
    exact_q = {r["question"] for r in train}
    norm_q = {normalise(r["question"]): r for r in train}
    norm_p = {normalise(post_of(r["question"])): r for r in train}
    canon_p = {canonical_key(post_of(r["question"])) for r in train} - {""}
    out = {}
    for name, rows in tests.items():
        hits_exact = [t for t in rows if t.question in exact_q]
        hits_norm = [t for t in rows if normalise(t.question) in norm_q]
        hits_post = [t for t in rows if normalise(post_of(t.question)) in norm_p]
        hits_canon = [t for t in rows if canonical_key(post_of(t.question)) in canon_p]
        out[name] = {"test_rows": len(rows), "exact_question": len(hits_exact),
                     "normalised_question": len(hits_norm), "normalised_post": len(hits_post),
                     "canonical_post": len(hits_canon),
                     "examples": [{"test": t.origin, "question": snippet(t.question)}
                                  for t in (hits_canon or hits_post or hits_norm)[:examples]]}
    return out
