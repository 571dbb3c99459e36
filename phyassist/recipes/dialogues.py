"""Dialogue files -> chat ``messages`` records (system/user/assistant), for both recipes.

Recipe A keeps one conversation per record (loss on every counselor turn); recipe B turns every
doctor turn into its own sample whose earlier turns are the history, as the case study did.
Every error names the file and the record index, so a student's own data fails loudly.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from phyassist.io import read_jsonl

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def load_json_records(path: str | Path) -> list:
    """A JSON array or JSON lines file as a list; errors name the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dialogue file not found")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return data
    return read_jsonl(path)


def detect_format(item, where: str) -> str:
    if isinstance(item, list):
        return "prefixed"
    if isinstance(item, dict):
        if "messages" in item:
            return "messages"
        if "conversations" in item:
            return "sharegpt"
        if "output" in item and ("instruction" in item or "input" in item):
            return "instruction"
    raise ValueError(f"{where}: unknown dialogue format (expected a 'messages' or 'conversations' list, "
                     f"instruction/input/output, or a list of prefixed utterances)")


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: content must be text, got {type(value).__name__}")
    return value.strip()


def parse_prefixed(utterances: list, user_prefix: str, assistant_prefix: str, where: str) -> list[dict]:
    """``['病人：…', '医生：…']`` -> messages; an utterance with neither tag is an error."""
    msgs = []
    for j, utt in enumerate(utterances):
        text = _check_text(utt, f"{where}, utterance {j}")
        if text.startswith(user_prefix):
            msgs.append({"role": "user", "content": text[len(user_prefix):].strip()})
        elif text.startswith(assistant_prefix):
            msgs.append({"role": "assistant", "content": text[len(assistant_prefix):].strip()})
        else:
            raise ValueError(f"{where}, utterance {j}: starts with neither {user_prefix!r} nor "
                             f"{assistant_prefix!r}: {text[:30]!r}")
    return msgs


def to_messages(item, fmt: str, where: str, user_prefix: str = "病人：",
                assistant_prefix: str = "医生：") -> list[dict]:
    """One source record in any supported format -> a list of ``{role, content}``."""
    fmt = detect_format(item, where) if fmt == "auto" else fmt
    if fmt == "prefixed":
        if not isinstance(item, list):
            raise ValueError(f"{where}: prefixed format expects a list of utterances")
        return parse_prefixed(item, user_prefix, assistant_prefix, where)
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    if fmt == "instruction":
        question = "\n".join(x for x in (item.get("instruction", ""), item.get("input", "")) if x)
        msgs = [{"role": "user", "content": _check_text(question, where)},
                {"role": "assistant", "content": _check_text(item.get("output"), f"{where}, field output")}]
        history = item.get("history") or []
        prior = [m for q, a in history for m in ({"role": "user", "content": q},
                                                 {"role": "assistant", "content": a})]
        return prior + msgs
    key, role_key, text_key, roles = (("messages", "role", "content", {r: r for r in ROLES})
                                      if fmt == "messages" else
                                      ("conversations", "from", "value", SHAREGPT_ROLES))
    turns = item.get(key)
    if not isinstance(turns, list):
        raise ValueError(f"{where}: field {key!r} must be a list")
    msgs = []
    for j, turn in enumerate(turns):
        w = f"{where}, turn {j}"
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ValueError(f"{w}: expected {{{role_key!r}, {text_key!r}}}")
        role = roles.get(turn[role_key])
        if role is None:
            raise ValueError(f"{w}: unknown role {turn[role_key]!r}")
        msgs.append({"role": role, "content": _check_text(turn[text_key], w)})
    return msgs


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Put the configured system prompt first (replacing one the source carried)."""
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": system}] if system else
            [m for m in messages if m["role"] == "system"][:1]) + rest


def conversations(items: Iterable, fmt: str, source: str, system: str | None = None,
                  user_prefix: str = "病人：", assistant_prefix: str = "医生：") -> list[dict]:
    """Records ``{source, id, messages}``: one whole conversation each (recipe A's unit)."""
    out = []
    for i, item in enumerate(items):
        msgs = to_messages(item, fmt, f"{source}: record {i}", user_prefix, assistant_prefix)
        out.append({"source": source, "id": i, "messages": with_system(msgs, system)})
    return out


def turn_samples(conv: dict, max_history_turns: int | None = None) -> list[dict]:
    """One sample per assistant turn: the earlier turns are the history (recipe B's unit)."""
    msgs = conv["messages"]
    system = [m for m in msgs if m["role"] == "system"][:1]
    body = [m for m in msgs if m["role"] != "system"]
    out = []
    for k, m in enumerate(body):
        if m["role"] != "assistant":
            continue
        history = body[:k]
        if max_history_turns is not None:
            history = history[-max_history_turns:]
        while history and history[0]["role"] != "user":  # a sample's prompt starts with the user
            history = history[1:]
        if not history:
            continue
        out.append({"source": conv["source"], "id": f"{conv['id']}-{k}", "turn": k,
                    "messages": system + history + [m]})
    return out


def sample_filter_reason(rec: dict, min_response_chars: int, max_chars: int | None) -> str | None:
    """Why a sample is dropped (None keeps it)."""
    answer = rec["messages"][-1]["content"]
    if len(answer) < max(min_response_chars, 1):
        return "empty_or_short_answer"
    if max_chars is not None and sum(len(m["content"]) for m in rec["messages"]) > max_chars:
        return "too_long"
    return None


def filter_samples(records: list[dict], min_response_chars: int = 1,
                   max_chars: int | None = None) -> tuple[list[dict], dict[str, int]]:
    kept, dropped = [], Counter()
    for rec in records:
        reason = sample_filter_reason(rec, min_response_chars, max_chars)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(rec)
    return kept, dict(dropped)


def split_off(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out: (rest, held_out). At least one held out when fraction > 0 and len > 1."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n = min(len(records) - 1, max(1, round(len(records) * fraction)))
    held = set(idx[:n])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def dialogue_key(rec: dict) -> str:
    """The dialogue a sample came from: ``<source file>:<record index>``. Turn samples carry ids
    ``<record>-<turn>``, so every doctor turn of one dialogue shares the key."""
    return f"{rec.get('source', '')}:{str(rec['id']).split('-')[0]}"


def split_off_dialogues(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out of whole dialogues: (rest, held_out), no dialogue on both sides.

    Turn samples of one dialogue share most of their text (the history), so a sample-level split
    would put the same conversation in training and evaluation."""
    keys = list(dict.fromkeys(dialogue_key(r) for r in records))
    _, held = split_off([{"key": k} for k in keys], fraction, seed)
    held_keys = {h["key"] for h in held}
    return ([r for r in records if dialogue_key(r) not in held_keys],
            [r for r in records if dialogue_key(r) in held_keys])


def seeded_cap(records: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or len(records) <= n:
        return list(records)
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in idx]


def prompt_messages(rec: dict) -> list[dict]:
    """The sample without its final assistant turn: what the model sees at generation time."""
    return rec["messages"][:-1]


def reference(rec: dict) -> str:
    return rec["messages"][-1]["content"]
