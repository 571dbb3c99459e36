"""Formatting through the model's chat template, token counts with the model's tokenizer, and
the optional note-section layout of answers.

The study's Mixtral-8x7B-Instruct tokenizer cannot be fetched from the Hub offline. Its
SentencePiece model (Mistral's v1 vocabulary, 32,000 pieces, which Mixtral-8x7B shares) ships inside
the PyPI wheel of ``mistral-common``; when the Hub tokenizer is unavailable the kit extracts that one
file (``pip download``, PyPI only), converts it once to a fast tokenizer in the cache, and pairs it
with the kit's MIXTRAL template, so ``<s>[INST] … [/INST] …</s>`` text and its token counts match
the study's tokenizer offline.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
from pathlib import Path

from phyassist.data.records import Row
from phyassist.models.schema import ModelConfig

MISTRAL_COMMON = "mistral-common==1.13.1"
MISTRAL_V1_MEMBER = "mistral_common/data/tokenizer.model.v1"
_MISTRAL_V1_CONFIG = ('{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", '
                      '"unk_token": "<unk>", "add_bos_token": true, "add_eos_token": false, "legacy": false}')


def _mistral_v1_model(dest: Path) -> Path:
    """Mistral's v1 SentencePiece model, taken from the mistral-common wheel on PyPI.

    The package is not installed: with it present, transformers routes every Mistral-family
    tokenizer through it (and its tiktoken dependency). ``pip download`` reaches only PyPI.
    """
    import subprocess
    import sys
    import tempfile
    import zipfile

    spec = importlib.util.find_spec("mistral_common")
    if spec is not None and spec.submodule_search_locations:
        local = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
        if local.is_file():
            shutil.copy(local, dest)
            return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, MISTRAL_COMMON]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FileNotFoundError(f"Mixtral's tokenizer is unavailable offline and `{' '.join(cmd[2:])}` "
                                    f"failed: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(MISTRAL_V1_MEMBER) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def mistral_v1_tokenizer():
    """Mixtral-8x7B's tokenizer (Mistral v1 SentencePiece) with the MIXTRAL chat template; converted
    once to a fast tokenizer and cached."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from phyassist.models.chat_templates import ensure_chat_template
    from phyassist.paths import cache_dir

    target = cache_dir() / "mistral-v1-tokenizer"
    if not (target / "tokenizer.json").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _mistral_v1_model(tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(_MISTRAL_V1_CONFIG, encoding="utf-8")
        AutoTokenizer.from_pretrained(tmp).save_pretrained(tmp / "converted")
        # Plain fast tokenizer, "▁" prepended to every text segment (also right after <s>) as in
        # Mixtral's tokenizer.json: "<s>[INST]" -> [1, 733, 16289, 28793].
        backend = Tokenizer.from_file(str(tmp / "converted" / "tokenizer.json"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
        PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(tmp / "plain")
        shutil.rmtree(target, ignore_errors=True)
        (tmp / "plain").rename(target)
        shutil.rmtree(tmp)
    tok = AutoTokenizer.from_pretrained(target)
    ensure_chat_template(tok, "mixtral")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def _uses_mistral_v1(name: str) -> bool:
    from phyassist.models.registry import get_spec

    spec = get_spec(name)
    return bool(spec and spec.source == "hub" and spec.chat_template == "mixtral"
                and spec.architecture.get("vocab_size") == 32000)


def formatting_tokenizer(mcfg: ModelConfig, verbose: bool = True):
    """The model's own tokenizer; for Mixtral/Mistral offline, the bundled v1 tokenizer."""
    from phyassist.models.loading import load_tokenizer

    try:
        return load_tokenizer(mcfg)
    except OSError as exc:
        if not _uses_mistral_v1(mcfg.name):
            raise
        if verbose:
            print(f"[data] {mcfg.name}: Hub tokenizer unavailable ({type(exc).__name__}); using Mistral's v1 "
                  "SentencePiece tokenizer from mistral-common with the MIXTRAL template", flush=True)
        return mistral_v1_tokenizer()


# --- note sections ----------------------------------------------------------------------------


def note_sections(answer: str, kind: str) -> str:
    """The app's note layout: IMHI's label and reasoning become the Analysis; a counsellor's
    answer becomes the Advice. Only sections the source has are written."""
    if kind == "imhi":
        label, sep, reasoning = answer.partition("Reasoning:")
        body = f"{label.strip()}\n{reasoning.strip()}" if sep else answer.strip()
        return f"Analysis:\n{body.strip()}"
    return f"Advice:\n{answer.strip()}"


# --- records ----------------------------------------------------------------------------------


def format_rows(tokenizer, rows: list[Row], system: str | None = None,
                kinds: dict[str, str] | None = None, sections: bool = False) -> list[dict]:
    """Records with the gold ``answer`` and the chat-formatted ``prompt``/``completion``/``text``."""
    from phyassist.models.chat_templates import format_prompt_completion

    out = []
    for r in rows:
        target = note_sections(r.answer, (kinds or {}).get(r.source, "table")) if sections else r.answer
        rec = format_prompt_completion(tokenizer, r.question, target, system)
        out.append({"source": r.source, "origin": r.origin, "question": r.question, "answer": r.answer, **rec})
    return out


def count_tokens(tokenizer, texts: list[str], batch_size: int = 512) -> list[int]:
    """Token lengths of already-formatted texts (special tokens in the text count once)."""
    n = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], add_special_tokens=False)["input_ids"]
        n.extend(len(ids) for ids in enc)
    return n


def token_stats(lengths_by_source: dict[str, list[int]]) -> dict[str, dict]:
    """count/mean/median/p95/max per source and overall."""
    def stats(xs: list[int]) -> dict:
        if not xs:
            return {"count": 0}
        s = sorted(xs)
        p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
        return {"count": len(s), "mean": round(statistics.fmean(s), 1), "median": statistics.median(s),
                "p95": p95, "max": s[-1], "min": s[0], "total": sum(s)}

    out = {k: stats(v) for k, v in lengths_by_source.items()}
    out["all"] = stats([x for v in lengths_by_source.values() for x in v])
    return out


def plot_token_lengths(lengths_by_source: dict[str, list[int]], path: Path, title: str,
                       max_tokens: int | None = None) -> Path:
    """Stacked histogram of formatted lengths per source (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phyassist.io import atomic_path

    data = {k: v for k, v in lengths_by_source.items() if v}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if data:
        top = max(max(v) for v in data.values())
        bins = min(60, max(10, top // 16))
        ax.hist(list(data.values()), bins=bins, stacked=True, label=list(data.keys()))
        ax.legend(fontsize=8)
    if max_tokens:
        ax.axvline(max_tokens, color="black", linestyle="--", linewidth=1)
        ax.text(max_tokens, ax.get_ylim()[1] * 0.95, f"max_tokens={max_tokens} ", fontsize=8, va="top", ha="right")
    ax.set_xlabel("tokens per formatted example (prompt + completion)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
