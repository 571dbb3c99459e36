"""The ``sft_sample`` construction's rejected replies: the SFT model's own answer to each prompt the
pair builder assigns it (:func:`phyassist.recipes.pairs.generation_requests`), generated in the
reward step, in batches, and cached.

Cache: ``<out>/preference/sft_samples.jsonl``, one line per answer with the sample's key, a hash of
its prompt and a tag of what made it (the SFT adapter's weights, max_new_tokens, temperature, seed).
A resumed run (or a rerun of the reward step) generates only what is not there yet; a retrained SFT
adapter or changed settings generate afresh. Lines are appended after every batch (fsynced), so a
kill mid-way keeps the finished batches.

Split hygiene: the SFT model was trained on the train split only, and each split's prompts are
answered by it, so a test pair holds the test prompt, the doctor's test reply and the model's answer
to that same prompt: no text of another dialogue (the pair's ``donor`` is empty).
"""

from __future__ import annotations

from pathlib import Path

from phyassist.io import append_jsonl, read_appended_jsonl
from phyassist.recipes.common import (adapter_fingerprint, adapter_problem, free_accelerator_memory, text_key)
from phyassist.recipes.pairs import pairs_dir


def cache_path(cfg) -> Path:
    return pairs_dir(cfg) / "sft_samples.jsonl"


def settings(cfg) -> dict:
    s = cfg.recipe.preference.sft_sample
    return {"max_new_tokens": s.max_new_tokens or cfg.recipe.predict.max_new_tokens,
            "batch_size": s.batch_size or cfg.recipe.predict.batch_size,
            "temperature": s.temperature, "seed": cfg.seed}


def read_cache(path: Path, tag: str) -> dict[str, dict]:
    """key -> cached row made with ``tag``; other tags and lines torn by a kill are ignored."""
    return {row.get("key"): row for row in read_appended_jsonl(path)
            if row.get("tag") == tag and isinstance(row.get("text"), str)}


def generate(cfg, adapter: Path, todo: list[dict], st: dict, on_batch) -> None:
    """The SFT model's replies to ``todo``'s prompts, handed to ``on_batch(candidates, texts)`` per batch."""
    import torch

    from phyassist.evaluate.generate import generate_batched
    from phyassist.models.inference import load_for_inference

    model, tok = load_for_inference(cfg, [adapter])
    prompts = [tok.apply_chat_template(c["prompt"], tokenize=False, add_generation_prompt=True) for c in todo]
    kw = {"do_sample": True, "temperature": st["temperature"]} if st["temperature"] > 0 else {}
    torch.manual_seed(st["seed"])
    generate_batched(model, tok, prompts, max_new_tokens=st["max_new_tokens"], batch_size=st["batch_size"],
                     desc="SFT samples (rejected)", on_batch=lambda idx, texts: on_batch([todo[i] for i in idx], texts),
                     **kw)
    del model
    free_accelerator_memory()


def sft_samples(cfg, requests: list[dict]) -> tuple[dict[str, str], str | None]:
    """(key -> the SFT model's reply for every requested candidate, a note when none could be made).

    Without a usable SFT adapter (the sft step not run, or its weights absent) nothing is generated:
    the note says why and the builder counts those pairs as skipped."""
    if not requests:
        return {}, None
    from phyassist.recipes.sft import sft_adapter_path

    adapter = sft_adapter_path(cfg)
    problem = adapter_problem(adapter, "SFT adapter")
    if problem:
        note = f"sft_sample pairs not built: {problem} (run the recipe's sft step first)"
        print(f"[recipe] preference: {note}", flush=True)
        return {}, note
    st = settings(cfg)
    tag = text_key(adapter_fingerprint(adapter), {k: v for k, v in st.items() if k != "batch_size"})
    path = cache_path(cfg)
    cached = read_cache(path, tag)
    unique = list({c["key"]: c for c in requests}.values())
    want = {c["key"]: text_key(c["prompt"]) for c in unique}
    out = {k: cached[k]["text"] for k, h in want.items() if k in cached and cached[k].get("prompt") == h}
    todo = [c for c in unique if c["key"] not in out]
    print(f"[recipe] preference: sft_sample: {len(out)} SFT replies cached in {path}, {len(todo)} to generate",
          flush=True)
    if todo:
        def keep(cands: list[dict], texts: list[str]) -> None:
            texts = [t.rstrip("\ufffd").strip() for t in texts]  # a character cut at max_new_tokens
            append_jsonl(path, [{"key": c["key"], "prompt": want[c["key"]], "tag": tag, "text": t}
                               for c, t in zip(cands, texts)])
            out.update({c["key"]: t for c, t in zip(cands, texts)})

        generate(cfg, adapter, todo, st, keep)
    return out, None
