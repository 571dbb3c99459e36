"""Load-back check: the folder as published, loaded offline on the base model, must give the
same logits as the model it came from on fixed prompts, and its tokenizer must encode those
prompts (through its chat template) to the same ids. A reader who downloads the adapter then
gets the answers the card's numbers were measured on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LogitComparison:
    max_abs_diff: float
    mean_abs_diff: float
    next_token_agreement: float  # share of positions whose argmax token is the same
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadBackResult:
    ok: bool
    tokens_match: bool
    comparison: LogitComparison
    atol: float

    def summary(self) -> str:
        c = self.comparison
        verdict = "PASS" if self.ok else "FAIL"
        return (f"load-back check {verdict}: max |logit diff| {c.max_abs_diff:.3g} (tolerance {self.atol:g}), "
                f"mean {c.mean_abs_diff:.3g}, next-token agreement {c.next_token_agreement:.1%} over "
                f"{c.positions} positions; tokenizer ids {'match' if self.tokens_match else 'DIFFER'}")


def encode_prompts(tokenizer, prompts: list[str]) -> list:
    """Each prompt as a user turn through the chat template, ready for generation (no padding)."""
    out = []
    for p in prompts:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, return_tensors="pt")
        out.append(enc["input_ids"])
    return out


def prompt_logits(model, encoded: list) -> list:
    """Logits at every position of every prompt, one forward pass each (exact: no padding)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in encoded]


def compare_logits(a: list, b: list) -> LogitComparison:
    import torch

    diffs = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b, strict=True)])
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b, strict=True)])
    return LogitComparison(float(diffs.max()), float(diffs.mean()), float(agree.mean()), int(agree.numel()))


def _same_ids(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all()) for x, y in zip(a, b))


def load_adapter_offline(cfg, adapter: Path, base=None):
    """Base model from the config (local files only) with ``adapter`` attached, in eval mode."""
    import os

    from peft import PeftModel

    from phyassist.models.loading import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = base if base is not None else load_model(cfg.model.model_copy(update={"local_files_only": True}))
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=False).eval()


def load_back_check(reference, reference_tokenizer, loaded, loaded_tokenizer, prompts: list[str],
                    atol: float) -> LoadBackResult:
    """Compare ``loaded`` (from the published folder) with ``reference`` on ``prompts``."""
    ref_ids = encode_prompts(reference_tokenizer, prompts)
    pkg_ids = encode_prompts(loaded_tokenizer, prompts)
    tokens_match = _same_ids(ref_ids, pkg_ids)
    comparison = compare_logits(prompt_logits(reference.eval(), ref_ids), prompt_logits(loaded, ref_ids))
    return LoadBackResult(tokens_match and comparison.max_abs_diff <= atol, tokens_match, comparison, atol)


def check_package(cfg, source_adapter: Path, package: Path, prompts: list[str] | None = None) -> LoadBackResult:
    """The CLI's check on one base model (a 4-bit Mixtral fits once, not twice): the source adapter
    and the packaged one are attached side by side and compared, all offline."""
    from transformers import AutoTokenizer

    from phyassist.publish.package import adapter_tokenizer

    model = load_adapter_offline(cfg, source_adapter)
    model.load_adapter(str(package), adapter_name="published", is_trainable=False)
    ref_tok = adapter_tokenizer(cfg, source_adapter)
    pkg_tok = AutoTokenizer.from_pretrained(package)
    prompts = prompts or cfg.publish.check_prompts
    ref_ids = encode_prompts(ref_tok, prompts)
    pkg_ids = encode_prompts(pkg_tok, prompts)
    tokens_match = _same_ids(ref_ids, pkg_ids)
    model.set_adapter("default")
    ref_logits = prompt_logits(model, ref_ids)
    model.set_adapter("published")
    comparison = compare_logits(ref_logits, prompt_logits(model, ref_ids))
    atol = cfg.publish.check_atol
    return LoadBackResult(tokens_match and comparison.max_abs_diff <= atol, tokens_match, comparison, atol)
