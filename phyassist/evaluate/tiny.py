"""Tiny random evaluation models for offline smoke runs and tests.

The real BARTScore model (facebook/bart-large-cnn) and MentalLLaMA's MentalBERT classifiers
(``Tianlin668/<set>``) must be downloaded; no machine of the kit's CI can. These stand-ins
have the same classes and code path (BartForConditionalGeneration + BartTokenizer,
BertForSequenceClassification + BertTokenizer) with random weights: their numbers mean
nothing, they prove the pipeline runs. Built once with a fixed seed and cached.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phyassist.paths import cache_dir

TINY_BART = "tiny-bart"
TINY_CLASSIFIERS = "tiny-mentalbert"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/BART byte-level alphabet: every byte maps to one printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _fresh(target: Path) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def build_tiny_bart(target: Path, seed: int = 0) -> Path:
    """A 2-layer random BART with a byte-level BartTokenizer (no merges: one token a byte)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    tmp = _fresh(target)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = BartTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=1024, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_bos_token_id=0)
    BartForConditionalGeneration(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, target)


def _bert_vocab() -> list[str]:
    """A small WordPiece vocabulary: specials, characters and the IMHI label words."""
    words = ("yes no not the post poster suffers suffer from depression stress loneliness risk "
             "shows show this does exist exists wellness dimension cause causes related to work "
             "school family social health financial emotional everyday other reasoning").split()
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()")
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars[:36]] + words


def build_tiny_classifier(target: Path, num_labels: int, seed: int = 0) -> Path:
    """A 2-layer random BERT sequence classifier with a BertTokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    tmp = _fresh(target)
    (tmp / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(tmp / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(_bert_vocab()), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                     num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, target)


def tiny_bart_path() -> Path:
    target = cache_dir() / TINY_BART
    return target if (target / "config.json").exists() else build_tiny_bart(target)


def tiny_classifier_path(task: str) -> Path:
    from phyassist.evaluate.labels import get_task

    n = len(get_task(task).classes)
    target = cache_dir() / TINY_CLASSIFIERS / task
    return target if (target / "config.json").exists() else build_tiny_classifier(target, n)


def resolve_eval_model(name: str) -> str:
    """``tiny-bart`` -> the cached tiny model; a local folder or Hub id unchanged."""
    if name == TINY_BART:
        return str(tiny_bart_path())
    p = Path(name).expanduser()
    return str(p) if p.exists() else name


def resolve_classifier(spec: str, task: str) -> str:
    """The classifier for ``task``: ``tiny-mentalbert``; a folder holding ``<task>/``; a
    classifier folder; or a Hub owner (``Tianlin668`` -> ``Tianlin668/<task>``)."""
    if spec == TINY_CLASSIFIERS:
        return str(tiny_classifier_path(task))
    p = Path(spec).expanduser()
    if (p / task / "config.json").exists():
        return str(p / task)
    if (p / "config.json").exists():
        return str(p)
    if p.exists():
        raise FileNotFoundError(f"{p}: no classifier for {task} (expected {p / task}/config.json)")
    return f"{spec.rstrip('/')}/{task}"
