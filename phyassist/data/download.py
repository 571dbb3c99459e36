"""Fetch the public sources into ``data.data_dir`` when ``data.download`` is on.

MentalLLaMA's files come from its GitHub repository (same layout as ``../shared/data``);
counsel-chat from its GitHub CSV, else from the Hub data set ``nbertagnolli/counsel-chat``.
Every file is written atomically, so an interrupted download leaves nothing half-written and
the next run fetches only what is still missing.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from phyassist.data.schema import DataConfig, SourceConfig
from phyassist.io import atomic_path

COUNSEL_CHAT_HUB = "nbertagnolli/counsel-chat"


def fetch_url(url: str, dest: Path, timeout: float = 60.0) -> bool:
    """Download ``url`` to ``dest`` atomically; False when the server has no such file."""
    from tqdm.auto import tqdm

    try:
        resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http(s) or file URLs from config)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise OSError(f"{url}: download failed (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(getattr(exc, "reason", exc), FileNotFoundError):  # file:// mirror without the file
            return False
        raise OSError(f"{url}: download failed ({getattr(exc, 'reason', exc)}); without internet, "
                      "point data.data_dir at a local copy and set data.download=false") from None
    total = int(resp.headers.get("Content-Length") or 0) or None
    with resp, atomic_path(dest) as tmp, open(tmp, "wb") as fh, \
            tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
        while chunk := resp.read(1 << 16):
            fh.write(chunk)
            bar.update(len(chunk))
    return True


def _counsel_chat_from_hub(dest: Path) -> bool:
    try:
        from datasets import load_dataset

        ds = load_dataset(COUNSEL_CHAT_HUB, split="train")
    except Exception as exc:  # the Hub is the second choice; report why it failed too
        raise OSError(f"counsel-chat: Hub data set {COUNSEL_CHAT_HUB} unavailable ({exc})") from None
    with atomic_path(dest) as tmp:
        ds.to_pandas().to_csv(tmp, index=False)
    return True


def make_fetcher(dcfg: DataConfig, root: Path):
    """``fetch(src, rel_paths) -> Path | None`` for :func:`phyassist.data.sources.locate`."""

    def fetch(src: SourceConfig, rels: list[str]) -> Path | None:
        for rel in rels:
            dest = root / rel
            if src.kind == "counsel_chat":
                ok = fetch_url(dcfg.counsel_chat_url, dest)
                if not ok:
                    ok = _counsel_chat_from_hub(dest)
            elif src.kind == "imhi":
                print(f"[data] downloading {dcfg.mentalllama_url}/{rel}", flush=True)
                ok = fetch_url(f"{dcfg.mentalllama_url}/{rel}", dest)
            else:
                return None
            if ok:
                return dest
        return None

    return fetch
