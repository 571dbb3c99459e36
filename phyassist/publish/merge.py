"""Adapter merging: several LoRA adapters combined with PEFT's ``add_weighted_adapter`` (linear,
cat, SVD, TIES, DARE, magnitude pruning) into one new adapter folder, which the evaluation and
publishing stages take like any trained adapter; and the export of a full merged model from a
16-bit base (``merge_and_unload``).

Merging into 4-bit weights re-quantizes the sum of base and LoRA delta, which is lossy;
``measure_merge_loss`` measures how much on fixed prompts (numbers in docs/publish.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from phyassist.config import RunConfig
from phyassist.publish.loadback import compare_logits, encode_prompts, prompt_logits
from phyassist.publish.package import (ADAPTER_CONFIG, MERGE_INFO, PATIENT_MARKER_FILE, PublishError,
                                       adapter_tokenizer, adapter_weights, is_patient_adapter,
                                       mark_patient_adapter)

PRUNING = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
           "magnitude_prune", "magnitude_prune_svd"}
DEFAULT_DENSITY = 0.5
LOSSY_4BIT_WARNING = (
    "merging a LoRA adapter into 4-bit weights re-quantizes base + delta and is lossy; the export "
    "merges into a 16-bit copy of the base instead (see docs/publish.md for measured differences)")


def parse_weights(text: str | None, n: int) -> list[float]:
    """``"0.5,0.5"`` -> [0.5, 0.5]; None -> equal weights summing to 1."""
    if not text:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise PublishError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.5") from None
    if len(weights) != n:
        raise PublishError(f"--weights has {len(weights)} value(s) for {n} adapter(s)")
    return weights


def check_mergeable(paths: list[Path]) -> None:
    if len(paths) < 1:
        raise PublishError("--merge needs at least one adapter folder")
    for p in paths:
        if not (p / ADAPTER_CONFIG).is_file():
            raise PublishError(f"{p}: not a PEFT adapter folder ({ADAPTER_CONFIG} missing)")
        adapter_weights(p)
    if len({p.resolve() for p in paths}) != len(paths):
        raise PublishError("--merge names the same adapter folder twice")


def merge_adapters(cfg: RunConfig, adapters: list[Path], output: Path, weights: list[float] | None = None,
                   combination: str | None = None, density: float | None = None, base=None) -> Path:
    """Combine ``adapters`` into one adapter folder at ``output`` (written atomically)."""
    import torch
    from peft import PeftModel, __version__ as peft_version

    from phyassist.models.loading import load_model

    adapters = [Path(a) for a in adapters]
    check_mergeable(adapters)
    mcfg = cfg.publish.merge
    combination = combination or mcfg.combination
    weights = weights or [1.0 / len(adapters)] * len(adapters)
    density = density if density is not None else mcfg.density
    if combination in PRUNING and density is None:
        density = DEFAULT_DENSITY
    elif combination not in PRUNING and density is not None:
        raise PublishError(f"density applies to TIES/DARE/magnitude pruning, not to '{combination}'")
    base = base if base is not None else load_model(cfg.model)
    names = [f"in{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(str(path), adapter_name=name)
    torch.manual_seed(cfg.seed)  # DARE prunes at random: the same seed gives the same adapter
    kwargs = dict(combination_type=combination, density=density, svd_rank=mcfg.svd_rank)
    if combination in {"ties", "ties_svd", "dare_ties", "dare_ties_svd"}:
        kwargs["majority_sign_method"] = mcfg.majority_sign_method
    try:
        model.add_weighted_adapter(names, weights, adapter_name="merged", **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise PublishError(f"cannot merge with '{combination}': {exc} (adapters with different ranks or "
                           "targets need combination cat or an *_svd variant)") from None
    info = {"adapters": [str(a) for a in adapters], "weights": weights, "combination": combination,
            "density": density, "majority_sign_method": kwargs.get("majority_sign_method"),
            "svd_rank": mcfg.svd_rank, "seed": cfg.seed, "peft": peft_version}
    _save_adapter(model, "merged", output, info, tokenizer=adapter_tokenizer(cfg, adapters[0]),
                  patient=any(is_patient_adapter(a) for a in adapters))
    return output


def _save_adapter(model, name: str, output: Path, info: dict, tokenizer, patient: bool) -> None:
    """PEFT saves a non-default adapter in a sub-folder: flatten it into ``output``, atomically."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(str(tmp / "save"), selected_adapters=[name])
        saved = tmp / "save" / name
        final = tmp / "adapter"
        saved.rename(final)
        (final / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(final)
        if patient:  # a merge of a patient adapter still memorises that patient's notes
            mark_patient_adapter(final)
        if output.exists():
            shutil.rmtree(output)
        final.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sixteen_bit(cfg: RunConfig, dtype: str | None = None):
    """The model section with 4-bit loading off (dtype: the config's, bfloat16 on 'auto' with a GPU)."""
    mcfg = cfg.model
    return mcfg.model_copy(update={"quant": mcfg.quant.model_copy(update={"load_in_4bit": False}),
                                   "dtype": dtype or mcfg.dtype})


def export_merged_model(cfg: RunConfig, adapter: Path, output: Path, dtype: str | None = None) -> Path:
    """A full model: ``adapter`` merged (merge_and_unload) into a 16-bit copy of the base."""
    from peft import PeftModel

    from phyassist.models.loading import load_model

    check_mergeable([adapter])
    if cfg.model.quant.load_in_4bit:
        warnings.warn(LOSSY_4BIT_WARNING, stacklevel=2)
        print(f"warning: {LOSSY_4BIT_WARNING}")
    base = load_model(sixteen_bit(cfg, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        adapter_tokenizer(cfg, adapter).save_pretrained(tmp)
        if is_patient_adapter(adapter):
            (tmp / PATIENT_MARKER_FILE).write_text("Merged from a patient adapter: never publish.\n")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def measure_merge_loss(cfg: RunConfig, adapter: Path, prompts: list[str] | None = None) -> dict:
    """Logit differences on fixed prompts between the ways of running one adapter:

    adapter on the 4-bit base (as trained with QLoRA), merged into the 4-bit weights (PEFT's
    merge_and_unload re-quantizes base + delta), merged into a 16-bit base, adapter on the 16-bit base, and the
    4-bit base alone (the adapter's own effect, to put the merging error in proportion).
    """
    from peft import PeftModel

    from phyassist.models.loading import load_model

    prompts = prompts or cfg.publish.check_prompts
    q4 = cfg.model.model_copy(update={"quant": cfg.model.quant.model_copy(update={"load_in_4bit": True})})
    ids = encode_prompts(adapter_tokenizer(cfg, adapter), prompts)
    logits = {}
    for label, mcfg in (("4bit", q4), ("16bit", sixteen_bit(cfg))):
        model = PeftModel.from_pretrained(load_model(mcfg), str(adapter)).eval()
        logits[f"adapter_on_{label}"] = prompt_logits(model, ids)
        if label == "4bit":
            with model.disable_adapter():
                logits["base_4bit"] = prompt_logits(model, ids)
        # merge into a freshly loaded model: on CPU, bitsandbytes repacks 4-bit weights at the first
        # forward pass, and merging after that dequantizes the wrong layout (garbage logits)
        model = PeftModel.from_pretrained(load_model(mcfg), str(adapter)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "may get different generations" is what we measure
            logits[f"merged_{label}"] = prompt_logits(model.merge_and_unload(), ids)
        del model
    pairs = [("merged_4bit", "adapter_on_4bit"), ("merged_16bit", "adapter_on_4bit"), ("merged_4bit", "merged_16bit"),
             ("merged_16bit", "adapter_on_16bit"), ("base_4bit", "adapter_on_4bit")]
    return {"model": cfg.model.name, "quant": cfg.model.quant.model_dump(), "dtype": cfg.model.dtype,
            "adapter": str(adapter), "prompts": len(prompts), "device": _device_name(),
            "comparisons": {f"{a} vs {b}": compare_logits(logits[a], logits[b]).as_dict() for a, b in pairs}}


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
