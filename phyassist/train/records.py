"""Training records to token ids: the data stage's JSONL, each record tokenized with the loss on the
answer only (prompt/completion records, or multi-turn ``messages`` split at each assistant turn)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from phyassist.io import read_jsonl

IGNORE = -100  # label of tokens outside the loss (transformers' ignore_index)


def data_file(cfg, split: str = "train") -> Path:
    return cfg.out / "data" / f"{split}.jsonl"


def read_records(cfg, split: str = "train", required: bool = True) -> list[dict] | None:
    """Records written by the data stage; a missing train file is an error naming the file."""
    path = data_file(cfg, split)
    if not path.exists():
        if required:
            raise FileNotFoundError(
                f"{path}: training data not found; run `python -m phyassist data --config <profile> "
                f"--output-dir {cfg.out}` first (or pass train_records=)")
        return None
    rows = read_jsonl(path)
    if required and not rows:
        raise ValueError(f"{path}: no records")
    return rows


def _segments(tokenizer, record: dict, index: int) -> list[tuple[str, bool]]:
    """The record as (text, in_loss) pieces: prompt/completion, or a multi-turn ``messages`` list
    rendered with the chat template and split at each assistant turn."""
    if "messages" in record and record["messages"]:
        msgs = record["messages"]
        pieces, done = [], ""
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError(f"record {index}: chat template does not render turns as prefixes")
            pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        if not pieces:
            raise ValueError(f"record {index}: messages contain no assistant turn")
        return pieces
    if "prompt" in record and "completion" in record:
        return [(record["prompt"], False), (record["completion"], True)]
    raise ValueError(f"record {index}: needs `prompt` and `completion`, or `messages` "
                     f"(got keys {sorted(record)})")


def tokenize_record(tokenizer, record: dict, max_length: int, completion_only: bool = True,
                    index: int = 0) -> dict:
    """``input_ids`` and ``labels`` (-100 outside the answer when ``completion_only``).

    Templates render special tokens into the text, so none are added here; an EOS ends the
    sequence so the model learns to stop.
    """
    ids, labels = [], []
    for text, in_loss in _segments(tokenizer, record, index):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (in_loss or not completion_only) else [IGNORE] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_dataset(tokenizer, records: Iterable[dict], max_length: int, completion_only: bool = True):
    """A tokenized ``datasets.Dataset``; records whose answer is cut off entirely are dropped."""
    from datasets import Dataset

    rows = [tokenize_record(tokenizer, r, max_length, completion_only, i) for i, r in enumerate(records)]
    rows = [r for r in rows if any(t != IGNORE for t in r["labels"])]
    if not rows:
        raise ValueError(f"no record has answer tokens within max_seq_length={max_length}")
    return Dataset.from_list(rows)
