"""BARTScore as MentalLLaMA computes it (``src/score.py`` with BARTScore's ``BARTScorer``).

score(generated, gold) = mean over the gold's tokens of log p(gold token | generated text,
previous gold tokens) under BART (facebook/bart-large-cnn, optionally with the ParaBank2
``bart_score.pth`` weights), both sides truncated to 1024 tokens, batches of 4. The set's
score is the plain mean over examples. Higher (closer to 0) is better.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

DEFAULT_MODEL = "facebook/bart-large-cnn"


class BARTScorer:
    """A BART seq2seq model that scores targets given sources."""

    def __init__(self, model: str = DEFAULT_MODEL, checkpoint: str | None = None,
                 device: str | None = None, max_length: int = 1024):
        import torch
        from transformers import AutoTokenizer, BartForConditionalGeneration

        from phyassist.evaluate.tiny import resolve_eval_model

        path = resolve_eval_model(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = BartForConditionalGeneration.from_pretrained(path)
        if checkpoint:
            if not Path(checkpoint).exists():
                raise FileNotFoundError(f"{checkpoint}: BARTScore checkpoint (bart_score.pth) not found")
            self.model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
        self.model.eval().to(self.device)

    def _encode(self, texts: list[str]):
        return self.tokenizer(texts, max_length=self.max_length, truncation=True, padding=True,
                              return_tensors="pt").to(self.device)

    def score(self, srcs: Sequence[str], tgts: Sequence[str], batch_size: int = 4,
              progress: bool = False) -> list[float]:
        """Per pair: mean log-likelihood of ``tgt`` tokens given ``src`` (pads excluded)."""
        import torch

        if len(srcs) != len(tgts):
            raise ValueError(f"BARTScore: {len(srcs)} sources but {len(tgts)} targets")
        scores: list[float] = []
        steps = range(0, len(srcs), batch_size)
        for i in tqdm(steps, desc="BARTScore", disable=not progress):
            src = self._encode([str(s) for s in srcs[i:i + batch_size]])
            tgt = self._encode([str(t) for t in tgts[i:i + batch_size]])
            with torch.no_grad():
                logits = self.model(input_ids=src.input_ids, attention_mask=src.attention_mask,
                                    labels=tgt.input_ids).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok_logp = logp.gather(-1, tgt.input_ids.unsqueeze(-1)).squeeze(-1)
            mask = tgt.attention_mask.to(tok_logp.dtype)
            scores += ((tok_logp * mask).sum(dim=1) / mask.sum(dim=1)).tolist()
        return scores


def bart_score(preds: Sequence[str], refs: Sequence[str], model: str = DEFAULT_MODEL,
               checkpoint: str | None = None, batch_size: int = 4, max_length: int = 1024,
               scorer: BARTScorer | None = None) -> float:
    """Mean BARTScore of the golds given the generated texts (MentalLLaMA's direction)."""
    from phyassist.evaluate.metrics import check_pairs

    check_pairs(preds, refs)
    scorer = scorer or BARTScorer(model, checkpoint, max_length=max_length)
    vals = scorer.score(list(preds), list(refs), batch_size=batch_size)
    return round(sum(vals) / len(vals), 4)


# MentalLLaMA's src/score.py loads BARTScore's ParaBank2 weights (bart_score.pth) over
# facebook/bart-large-cnn. BARTScore's README links them on Google Drive under this file id.
PARABANK_DRIVE_ID = "1_7JfF7KOInb7ZrxKHIigTMR4ChVET01m"
PARABANK_FILE = "bart_score.pth"


def variant_name(model: str | None, checkpoint: str | None) -> str:
    """The BARTScore variant a number came from, for every table that shows one."""
    if not model:
        return "none"
    name = Path(model).name if Path(model).exists() else model
    return f"{name}+ParaBank2" if checkpoint else name


def download_parabank_checkpoint(dest: str | Path, timeout: float = 60.0) -> Path:
    """Fetch ``bart_score.pth`` (ParaBank2-tuned BART, ~1.6 GB) into ``dest`` (a folder or file path).

    Google Drive answers a large file with a confirmation page first; its token is read from the
    page (or its cookie) and the download repeated with it. An existing file is kept. Offline, or
    when Drive refuses, the error says where to get the file by hand and to pass its local path
    (``evaluate.bartscore_checkpoint``).
    """
    import re
    import urllib.request
    from http.cookiejar import CookieJar

    from phyassist.io import atomic_path

    dest = Path(dest)
    path = dest / PARABANK_FILE if dest.suffix != ".pth" else dest
    if path.exists() and path.stat().st_size > 0:
        return path
    url = f"https://drive.google.com/uc?export=download&id={PARABANK_DRIVE_ID}"
    manual = (f"download {PARABANK_FILE} by hand from https://drive.google.com/file/d/{PARABANK_DRIVE_ID} "
              f"(linked from github.com/neulab/BARTScore) and set evaluate.bartscore_checkpoint to its path")
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    try:
        resp = opener.open(url, timeout=timeout)
        if "text/html" in resp.headers.get("Content-Type", ""):
            page = resp.read().decode("utf-8", "replace")
            token = next((c.value for c in jar if c.name.startswith("download_warning")), None)
            m = re.search(r'name="confirm" value="([^"]+)"', page) or re.search(r"confirm=([0-9A-Za-z_-]+)", page)
            token = token or (m.group(1) if m else "t")
            uuid = re.search(r'name="uuid" value="([^"]+)"', page)
            url2 = f"https://drive.usercontent.google.com/download?id={PARABANK_DRIVE_ID}&export=download&confirm={token}"
            if uuid:
                url2 += f"&uuid={uuid.group(1)}"
            resp = opener.open(url2, timeout=timeout)
            if "text/html" in resp.headers.get("Content-Type", ""):
                raise OSError("Google Drive returned a page instead of the file")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
    except OSError as e:
        raise OSError(f"{PARABANK_FILE}: download failed ({e}); {manual}") from None
    return path
