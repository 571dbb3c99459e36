"""The unit the data stage works on: one question/answer pair and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Input that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class Row:
    source: str  # config name of the source (DR, counsel-chat, ...)
    question: str
    answer: str  # the gold answer evaluation compares against
    origin: str  # "file:row" (1-based data row, header excluded) so a report points at the line
    group: str = ""  # the source's own group id (counsel-chat questionID); see sources.group_of
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Removed:
    row: Row
    rule: str
    detail: str = ""


def snippet(text: str, width: int = 160) -> str:
    """A one-line excerpt for reports."""
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


# --- which chat template the records were formatted for ---------------------------------------

MANIFEST = "records.json"
_PROBE = ("<probe question>", "<probe answer>")


def format_probe(tokenizer, system: str | None = None) -> str:
    """A fixed probe conversation as the tokenizer's chat template renders it."""
    from phyassist.models.chat_templates import format_prompt_completion

    return format_prompt_completion(tokenizer, *_PROBE, system)["text"]


def template_fingerprint(tokenizer, system: str | None = None) -> str:
    """A short hash of :func:`format_probe`.

    Hashing the rendering rather than the template source means two tokenizers that format text
    the same way (say, the Hub's Mixtral tokenizer and the kit's offline copy) agree, and any
    difference that would change the training text (markers, BOS/EOS, spacing) does not."""
    import hashlib

    return hashlib.sha256(format_probe(tokenizer, system).encode("utf-8")).hexdigest()[:16]


def records_manifest(model_name: str, tokenizer, system: str | None = None) -> dict:
    """What ``<out>/data/records.json`` holds: the model and chat template the records are for."""
    return {"model": model_name, "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "template_fingerprint": template_fingerprint(tokenizer, system),
            "probe": format_probe(tokenizer, system)}


def check_records_template(data_dir, model_name: str, tokenizer, system: str | None = None) -> dict | None:
    """Refuse records formatted for another chat template than ``tokenizer``'s.

    Returns the manifest, or None when ``data_dir`` holds no records or records without a manifest
    (written by hand or by an older kit: their template is unknown, which is said once, not
    refused). The fix for a mismatch is always the same: rerun the data stage for this model."""
    import json
    from pathlib import Path

    data_dir = Path(data_dir)
    if not (data_dir / "train.jsonl").exists():
        return None
    rerun = "rerun the data stage (`python -m phyassist data --config <profile> ...`, or notebook 01) for this model"
    path = data_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"[data] {data_dir}: records without {MANIFEST}; their chat template cannot be checked against "
              f"{model_name!r}", flush=True)
        return None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {rerun}") from None
    want = template_fingerprint(tokenizer, system)
    if manifest.get("template_fingerprint") != want:
        raise DataError(
            f"{data_dir}: records were formatted for model {manifest.get('model')!r} "
            f"(chat template {manifest.get('template_fingerprint')}), but this run's model, {model_name}, "
            f"formats with chat template {want}; training on them would teach the wrong format. {rerun}")
    return manifest


def check_run_records(cfg, tokenizer=None) -> dict | None:
    """:func:`check_records_template` for a run: ``<out>/data`` against ``cfg.model``'s formatting
    tokenizer (the one the data stage formats with). Called by train, evaluate and the app."""
    if not (cfg.out / "data" / "train.jsonl").exists():
        return None
    if tokenizer is None:
        from phyassist.data.format import formatting_tokenizer

        tokenizer = formatting_tokenizer(cfg.model, verbose=False)
    model = cfg.model.name + ("" if cfg.model.chat_template == "auto" else
                              f" (model.chat_template: {cfg.model.chat_template})")
    return check_records_template(cfg.out / "data", model, tokenizer, cfg.data.system_prompt)
