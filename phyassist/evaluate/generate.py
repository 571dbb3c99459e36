"""Batched, left-padded generation, and per-set output files that survive a killed run.

Prompts are sorted by length so each batch pads little; results come back in input order.
Per set, finished chunks are appended (and fsynced) to ``<SET>.partial.jsonl``; a rerun
skips every query already there and the CSV (``goldens, generated_text``, MentalLLaMA's
layout) is written atomically once the set is complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from phyassist.io import append_jsonl, atomic_path, read_appended_jsonl


def chat_prompts(tokenizer, queries: Sequence[str], system: str | None = None) -> list[str]:
    """Each query rendered with the model's chat template, ending where the answer begins."""
    from phyassist.models.chat_templates import build_messages

    return [tokenizer.apply_chat_template(build_messages(q, None, system), tokenize=False,
                                          add_generation_prompt=True) for q in queries]


def generation_kwargs(tokenizer, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, num_beams: int = 1) -> dict:
    """``generate`` settings: greedy unless ``do_sample``; pad = the tokenizer's pad token."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
              repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batched(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256,
                     batch_size: int = 8, progress: bool = True, desc: str = "generate",
                     on_batch: Callable[[list[int], list[str]], None] | None = None,
                     **gen_kwargs) -> list[str]:
    """Answers to ``prompts`` (already chat-formatted), in order; greedy unless told otherwise.

    ``on_batch(indices, texts)`` is called after each batch (used to checkpoint to disk). Prompts run
    longest first, so each batch pads little; the bar shows generated tokens per second.
    """
    import time

    import torch

    from phyassist.models.generation import generate

    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set one before batched generation")
    kw = generation_kwargs(tokenizer, max_new_tokens) | gen_kwargs
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="ex")
    start, new_tokens = time.perf_counter(), 0
    for idx in _batches(order, batch_size):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        with torch.inference_mode():
            ids = generate(model, **enc, **kw)
        answer = ids[:, enc.input_ids.shape[1]:]
        new_tokens += int((answer != tokenizer.pad_token_id).sum())
        bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} tok/s", refresh=False)
        texts = tokenizer.batch_decode(answer, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        for i, t in zip(idx, texts):
            out[i] = t
        if on_batch is not None:
            on_batch(idx, texts)
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def query_key(query: str) -> str:
    """A short hash that ties a saved answer to its query (a changed test file is noticed)."""
    return hashlib.sha1(query.encode("utf-8")).hexdigest()[:16]


def read_partial(path: Path, queries: Sequence[str]) -> dict[int, str]:
    """Answers already saved for these queries; lines for other queries (or torn) are ignored."""
    done: dict[int, str] = {}
    for rec in read_appended_jsonl(path):
        try:
            i = int(rec["i"])
        except (KeyError, TypeError, ValueError):
            continue
        if 0 <= i < len(queries) and rec.get("key") == query_key(queries[i]) and isinstance(rec.get("text"), str):
            done[i] = rec["text"]
    return done




def write_outputs_csv(path: Path, goldens: Sequence[str], generated: Sequence[str]) -> Path:
    """MentalLLaMA's output file: columns ``goldens, generated_text`` (atomic)."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame({"goldens": list(goldens), "generated_text": list(generated)}).to_csv(
            tmp, index=False, escapechar="\\")
    return path


def read_outputs_csv(path: Path) -> tuple[list[str], list[str]]:
    """``goldens`` and ``generated_text`` of an output file; errors name the file and column."""
    import pandas as pd

    df = pd.read_csv(path, keep_default_na=False, escapechar="\\")
    missing = [c for c in ("goldens", "generated_text") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected goldens, generated_text")
    if df.empty:
        raise ValueError(f"{path}: no rows")
    return df["goldens"].astype(str).tolist(), df["generated_text"].astype(str).tolist()


def generate_set(model, tokenizer, queries: Sequence[str], goldens: Sequence[str], csv_path: Path,
                 system: str | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                 chunk_batches: int = 4, progress: bool = True, **gen_kwargs) -> list[str]:
    """Generate one set into ``csv_path``, resuming from its ``.partial.jsonl``.

    An existing complete CSV for the same goldens is reused as is.
    """
    csv_path = Path(csv_path)
    if csv_path.exists():
        old_gold, old_gen = read_outputs_csv(csv_path)
        if old_gold == [str(g) for g in goldens]:
            return old_gen
    partial = csv_path.with_name(csv_path.stem + ".partial.jsonl")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_partial(partial, queries)
    todo = [i for i in range(len(queries)) if i not in done]
    if todo:
        prompts = chat_prompts(tokenizer, [queries[i] for i in todo], system)
        pending: list[dict] = []

        def checkpoint(idx: list[int], texts: list[str]) -> None:
            pending.extend({"i": todo[j], "key": query_key(queries[todo[j]]), "text": t}
                           for j, t in zip(idx, texts))
            if len(pending) >= batch_size * chunk_batches:
                append_jsonl(partial, pending)
                pending.clear()

        texts = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, progress,
                                 desc=f"generate {csv_path.parent.name}/{csv_path.stem}",
                                 on_batch=checkpoint, **gen_kwargs)
        if pending:
            append_jsonl(partial, pending)
        done.update({i: t for i, t in zip(todo, texts)})
    generated = [done[i] for i in range(len(queries))]
    write_outputs_csv(csv_path, goldens, generated)
    partial.unlink(missing_ok=True)
    return generated
