"""Write beside a run's outputs what produced them: the resolved config and library versions."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from phyassist.config import RunConfig, to_yaml
from phyassist.io import atomic_write_json, atomic_write_text

TRACKED = ("phyassist", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate",
           "datasets", "sentence-transformers", "sacrebleu", "rouge-score", "gradio", "wandb")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_run_info(cfg: RunConfig, out_dir: str | Path | None = None) -> Path:
    """Write ``config.resolved.yaml`` and ``versions.json``; return the output folder."""
    out = Path(out_dir) if out_dir else cfg.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.resolved.yaml", to_yaml(cfg))
    atomic_write_json(out / "versions.json", versions())
    return out
