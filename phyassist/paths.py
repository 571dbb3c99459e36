"""Where things live: the repo, the model cache, the bundled sample and the local data copies."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
IMAGES_DIR = REPO_ROOT / "images"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def screenshots_dir() -> Path:
    """Where the browser tests save their screenshots: ``PHYASSIST_SCREENSHOTS`` (``make screenshots``
    sets it to the tracked ``images/``), else ``runs/screenshots`` (ignored by git), so that
    ``make test`` leaves the committed screenshots as they are."""
    env = os.environ.get("PHYASSIST_SCREENSHOTS")
    return Path(env) if env else REPO_ROOT / "runs" / "screenshots"


def cache_dir() -> Path:
    """Model cache (dequantized GGUF, tiny models); ``PHYASSIST_CACHE`` overrides."""
    d = Path(os.environ.get("PHYASSIST_CACHE", Path.home() / ".cache" / "phyassist"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def shared_data_dir() -> Path | None:
    """The real data copies beside the checkout (``../shared/data``), or ``PHYASSIST_DATA``."""
    env = os.environ.get("PHYASSIST_DATA")
    for cand in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None
