"""Labels by MentalLLaMA's method: one MentalBERT classifier per set reads the generated text
only (truncated to 512 tokens); the argmax index names the class in the set's order
(:mod:`phyassist.evaluate.labels`, the order of MentalLLaMA's ``label_inference.py``)."""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm


def classify(texts: Sequence[str], task: str, model_path: str, batch_size: int = 8,
             max_length: int = 512, device: str | None = None, progress: bool = False) -> list[str]:
    """Class names predicted by the classifier at ``model_path`` for ``texts``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from phyassist.evaluate.labels import get_task

    t = get_task(task)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval().to(device)
    if model.config.num_labels != len(t.classes):
        raise ValueError(f"{model_path}: classifier has {model.config.num_labels} outputs but "
                         f"{task} has {len(t.classes)} classes {list(t.classes)}")
    out: list[str] = []
    for i in tqdm(range(0, len(texts), batch_size), desc=f"classify {task}", disable=not progress):
        batch = ["" if x is None else str(x) for x in texts[i:i + batch_size]]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length).to(device)
        with torch.no_grad():
            idx = model(**enc).logits.argmax(dim=-1).tolist()
        out += [t.classes[j] for j in idx]
    return out
