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
