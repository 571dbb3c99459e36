"""Build the folder that goes to the Hub: adapter weights and config, tokenizer and chat
template, the resolved training config, the evaluation report and the model card.

The folder is built in a temporary sibling and renamed into place, so an interrupted build
never leaves a half-written package that a later upload could pick up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phyassist.config import RunConfig
from phyassist.models.inference import ADAPTER_WEIGHTS, adapter_weights_file

ADAPTER_CONFIG = "adapter_config.json"
MERGE_INFO = "merge_info.json"
CARD_NAME = "README.md"
RESOLVED_CONFIG = "config.resolved.yaml"

# Agreed with the app (issue 7): a per-patient adapter memorises patient notes and is never published.
PATIENT_MARKER_FILE = "PATIENT_DATA"
PATIENT_MARKER_KEY = "phyassist_patient_adapter"


class PublishError(ValueError):
    """Publishing cannot go on; the message says what is missing and how to fix it."""


class PatientAdapterError(PublishError):
    """The adapter was trained on patient notes from the app."""


@dataclass(frozen=True)
class EvalFiles:
    """Evaluation outputs found for the run (either may be None when optional)."""

    table: Path | None
    report: Path | None


def run_path(cfg: RunConfig, value: str | None, default: str) -> Path:
    """A config path: absolute as given, relative to the run's output folder otherwise."""
    p = Path(value or default).expanduser()
    return p if p.is_absolute() else cfg.out / p


def adapter_dir(cfg: RunConfig, override: str | Path | None = None) -> Path:
    return Path(override) if override else run_path(cfg, cfg.publish.adapter_dir, "adapter")


def package_dir(cfg: RunConfig, override: str | Path | None = None) -> Path:
    return Path(override) if override else run_path(cfg, cfg.publish.package_dir, "publish/package")


def read_adapter_config(path: Path) -> dict:
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PublishError(f"{path / ADAPTER_CONFIG}: not valid JSON ({exc.msg})") from None


def mark_patient_adapter(path: str | Path) -> None:
    """Mark an adapter folder as trained on patient notes (both markers, so either survives)."""
    path = Path(path)
    (path / PATIENT_MARKER_FILE).write_text(
        "This adapter was trained on patient notes. It must never be published or shared.\n",
        encoding="utf-8")
    cfg_path = path / ADAPTER_CONFIG
    if cfg_path.exists():
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        data[PATIENT_MARKER_KEY] = True
        from phyassist.io import atomic_write_json

        atomic_write_json(cfg_path, data)


def is_patient_adapter(path: str | Path) -> bool:
    """True when either marker is present: the ``PATIENT_DATA`` file or the adapter_config key."""
    path = Path(path)
    if (path / PATIENT_MARKER_FILE).exists():
        return True
    cfg_path = path / ADAPTER_CONFIG
    if cfg_path.exists():
        try:
            return bool(json.loads(cfg_path.read_text(encoding="utf-8")).get(PATIENT_MARKER_KEY))
        except json.JSONDecodeError:
            return False
    return False


def refuse_patient_adapter(path: Path) -> None:
    if is_patient_adapter(path):
        raise PatientAdapterError(
            f"{path}: this adapter was trained on patient notes from the PhyAssist app "
            f"({PATIENT_MARKER_FILE} file or '{PATIENT_MARKER_KEY}' in {ADAPTER_CONFIG}); "
            "patient adapters memorise notes and are never published")


def adapter_weights(path: Path) -> Path:
    weights = adapter_weights_file(path)
    if weights is not None:
        return weights
    raise PublishError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def check_adapter(path: Path) -> Path:
    """The adapter folder, validated: present, PEFT-shaped, not a patient adapter."""
    if not path.is_dir():
        raise PublishError(
            f"{path}: no adapter here. Train one first (`python -m phyassist train --config ...`, "
            "notebook 02) or name one with --adapter DIR / publish.adapter_dir")
    refuse_patient_adapter(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise PublishError(f"{path}: not a PEFT adapter folder ({ADAPTER_CONFIG} missing)")
    adapter_weights(path)
    return path


def find_eval_files(cfg: RunConfig) -> EvalFiles:
    """The evaluation table and report; a clear error when missing unless configured optional."""
    table = run_path(cfg, cfg.publish.eval_results, "eval/comparison.csv")
    report = run_path(cfg, cfg.publish.eval_report, "eval/comparison.md")
    found = EvalFiles(table if table.is_file() else None, report if report.is_file() else None)
    if found.table is None and found.report is None and not cfg.publish.eval_optional:
        raise PublishError(
            f"no evaluation report: neither {table} nor {report} exists. Run the evaluation stage "
            "(`python -m phyassist evaluate --config ...`, notebook 03), point publish.eval_results / "
            "publish.eval_report at its files, or set publish.eval_optional=true")
    return found


def adapter_tokenizer(cfg: RunConfig, src_adapter: Path):
    """The tokenizer the run used (saved with the adapter when present) with its chat template."""
    from phyassist.models.loading import load_tokenizer

    if not (src_adapter / "tokenizer_config.json").exists():
        return load_tokenizer(cfg.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_adapter)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = load_tokenizer(cfg.model).chat_template
    return tok


def _adapter_config_for_hub(src: Path, base_model: str | None) -> dict:
    """adapter_config.json with the Hub id of the base model (training may record a cache path)."""
    data = read_adapter_config(src)
    if base_model:
        data["base_model_name_or_path"] = base_model
    return data


def _resolved_config_text(cfg: RunConfig) -> str:
    """The training run's resolved config when it exists, else this config resolved now."""
    path = cfg.out / RESOLVED_CONFIG
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from phyassist.config import to_yaml

    return to_yaml(cfg)


def build_package(cfg: RunConfig, *, adapter: Path | None = None, dest: Path | None = None,
                  card_text: str, base_model: str | None, eval_files: EvalFiles) -> Path:
    """Write the publishable folder atomically and return its path."""
    src = check_adapter(adapter_dir(cfg, adapter))
    dest = package_dir(cfg, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        weights = adapter_weights(src)
        shutil.copy2(weights, tmp / weights.name)
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(_adapter_config_for_hub(src, base_model), indent=2) + "\n", encoding="utf-8")
        if (src / MERGE_INFO).exists():
            shutil.copy2(src / MERGE_INFO, tmp / MERGE_INFO)
        adapter_tokenizer(cfg, src).save_pretrained(tmp)
        (tmp / RESOLVED_CONFIG).write_text(_resolved_config_text(cfg), encoding="utf-8")
        for f in (eval_files.table, eval_files.report):
            if f is not None:
                (tmp / "eval").mkdir(exist_ok=True)
                shutil.copy2(f, tmp / "eval" / f.name)
        (tmp / CARD_NAME).write_text(card_text, encoding="utf-8")
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Swap ``tmp`` into ``dest``: the old folder is moved aside first, then removed."""
    old = None
    if dest.exists() and any(dest.iterdir()) and not (dest / CARD_NAME).exists():
        raise PublishError(f"{dest}: exists and is not a package built by this stage; "
                           "choose another --package-dir (publish.package_dir)")
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(path in repo, size in bytes) for every file that an upload of ``folder`` sends."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size)
                  for p in folder.rglob("*") if p.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
