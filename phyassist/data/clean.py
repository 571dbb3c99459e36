"""Cleaning rules. Each is a small pure function ``rows -> Outcome(kept, removed, fixed)``:
removed rows carry the rule's name and why, so nothing is dropped silently.

Text in any script is content: the rules look for links, mojibake, control characters and
repeats, never for "special characters".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from phyassist.data.records import Removed, Row

DESCRIPTIONS = {
    "held_out_split": "rows of the source's own held-out split (counsel-chat `split` column)",
    "control_chars": "control characters removed (row kept)",
    "mojibake": "mis-decoded text (e.g. `donâ€™t`) repaired with ftfy (row kept)",
    "mojibake_unfixable": "mis-decoded text that ftfy could not repair (or repair is off)",
    "whitespace": "runs of spaces, tabs and blank lines normalised (row kept)",
    "empty": "question or answer empty (no letters or digits)",
    "links": "question or answer contains a URL",
    "too_long_chars": "question + answer longer than cleaning.max_chars characters",
    "exact_duplicate": "same normalised question and answer as an earlier row",
    "near_duplicate": "word-shingle Jaccard similarity >= cleaning.near_dup_threshold to an earlier row",
    "test_overlap": "post/question also appears in a test set (leakage)",
    "too_long_tokens": "formatted text longer than cleaning.max_tokens tokens (model tokenizer)",
}


@dataclass
class Outcome:
    kept: list[Row]
    removed: list[Removed] = field(default_factory=list)
    fixed: int = 0  # rows kept but changed


def _map_text(rows: list[Row], fn: Callable[[str], str]) -> Outcome:
    out, fixed = [], 0
    for r in rows:
        q, a = fn(r.question), fn(r.answer)
        if (q, a) != (r.question, r.answer):
            fixed += 1
            r = replace(r, question=q, answer=a)
        out.append(r)
    return Outcome(out, fixed=fixed)


def _filter(rows: list[Row], rule: str, why: Callable[[Row], str | None]) -> Outcome:
    kept, removed = [], []
    for r in rows:
        reason = why(r)
        if reason is None:
            kept.append(r)
        else:
            removed.append(Removed(r, rule, reason))
    return Outcome(kept, removed)


# --- text repairs (rows kept) -------------------------------------------------------------

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc minus \t and \n


def strip_controls(text: str) -> str:
    """Drop C0/C1 control characters (NUL, BEL, \\x1b, ...) but keep newlines and tabs."""
    return _CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def fix_controls(rows: list[Row]) -> Outcome:
    return _map_text(rows, strip_controls)


_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def normalise_whitespace(text: str) -> str:
    """Collapse spaces within a line, trim lines, keep at most one blank line between paragraphs."""
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def fix_whitespace(rows: list[Row]) -> Outcome:
    return _map_text(rows, normalise_whitespace)


def has_mojibake(text: str) -> bool:
    import ftfy.badness

    return not text.isascii() and ftfy.badness.is_bad(text)


def repair_mojibake(text: str) -> str:
    """Undo mis-decoding only: quotes, ligatures, widths and HTML stay as written."""
    import ftfy

    return ftfy.fix_text(text, unescape_html=False, uncurl_quotes=False, fix_latin_ligatures=False,
                         fix_character_width=False, normalization="NFC")


def fix_mojibake(rows: list[Row], repair: bool = True) -> tuple[Outcome, Outcome]:
    """(repairs, drops): with ``repair`` rows are fixed and only unfixable ones dropped;
    without it every row with mojibake is dropped."""
    kept, removed, fixed = [], [], 0
    for r in rows:
        fields, reason = {}, None
        for name in ("question", "answer"):
            text = getattr(r, name)
            if not has_mojibake(text):
                continue
            new = repair_mojibake(text) if repair else text
            if has_mojibake(new):
                reason = f"{name}: {_first_bad_span(new)!r}" + (" (left after repair)" if repair else "")
                break
            fields[name] = new
        if reason:
            removed.append(Removed(r, "mojibake_unfixable", reason))
            continue
        if fields:
            fixed += 1
            r = replace(r, **fields)
        kept.append(r)
    return Outcome(kept, fixed=fixed), Outcome(kept, removed)


def _first_bad_span(text: str, width: int = 24) -> str:
    for i, ch in enumerate(text):
        if ord(ch) > 127 and has_mojibake(text[max(0, i - 2): i + 3]):
            return text[max(0, i - 6): i + width]
    return text[:width]


# --- drops ----------------------------------------------------------------------------------


def _no_content(text: str) -> bool:
    return not any(ch.isalnum() for ch in text)


def drop_empty(rows: list[Row]) -> Outcome:
    def why(r: Row) -> str | None:
        if _no_content(r.question):
            return "question is empty"
        if _no_content(r.answer):
            return "answer is empty"
        return None

    return _filter(rows, "empty", why)


URL = re.compile(r"(?i)\b(?:https?://|ftp://|www\.)\S+"
                 r"|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|edu|gov|io|co|ly|me|info|uk|de|tv|us)/\S*")


def find_link(text: str) -> str | None:
    m = URL.search(text)
    return m.group(0) if m else None


def drop_links(rows: list[Row]) -> Outcome:
    def why(r: Row) -> str | None:
        for name, text in (("question", r.question), ("answer", r.answer)):
            link = find_link(text)
            if link:
                return f"{name}: {link}"
        return None

    return _filter(rows, "links", why)


def drop_too_long_chars(rows: list[Row], max_chars: int) -> Outcome:
    def why(r: Row) -> str | None:
        n = len(r.question) + len(r.answer)
        return f"{n} characters > {max_chars}" if n > max_chars else None

    return _filter(rows, "too_long_chars", why)


def drop_too_long_tokens(rows: list[Row], n_tokens: dict[str, int], max_tokens: int) -> Outcome:
    """``n_tokens``: formatted length per row origin (counted by the caller's tokenizer)."""
    def why(r: Row) -> str | None:
        n = n_tokens[r.origin]
        return f"{n} tokens > {max_tokens}" if n > max_tokens else None

    return _filter(rows, "too_long_tokens", why)


def drop_held_out_split(rows: list[Row], split: str) -> Outcome:
    """Rows that carry their own split (counsel-chat): train/val never read its test rows;
    ``split: test`` reads only them."""
    def why(r: Row) -> str | None:
        s = r.extra.get("split", "")
        if not s:
            return None
        if split == "test":
            return None if s == "test" else f"split={s} (reading the test split)"
        return "split=test (held out for evaluation)" if s == "test" else None

    return _filter(rows, "held_out_split", why)


def drop_test_overlap(rows: list[Row], test_keys: set[str]) -> Outcome:
    """Rows whose group (normalised post, or the source's own id) or question is a test item's, or
    whose post is one after mojibake repair and with spacing dropped (``split.test_keys``)."""
    from phyassist.data.split import canonical_key
    from phyassist.data.sources import group_of, normalise, post_of

    def why(r: Row) -> str | None:
        if group_of(r) in test_keys:
            return "post appears in a test set"
        if canonical_key(post_of(r.question)) in test_keys:
            return "post appears in a test set (through mojibake or spacing)"
        if normalise(r.question) in test_keys:
            return "question appears in a test set"
        return None

    return _filter(rows, "test_overlap", why)
