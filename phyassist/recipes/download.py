"""Real download code for the recipes' data sets (users have internet; tests use local copies).

Each function returns the local folder or file and does nothing when it is already there, so a
rerun after an interrupted download only fetches what is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

from phyassist.io import atomic_path
from phyassist.paths import cache_dir

SOULCHAT_ID = "YIRONGCHEN/SoulChatCorpus"
COVID_REPO = "https://github.com/UCSD-AI4H/COVID-Dialogue"


def download_soulchat(target: str | Path | None = None, dataset_id: str = SOULCHAT_ID) -> Path:
    """SoulChatCorpus from ModelScope (``pip install modelscope``), into ``target``."""
    target = Path(target or cache_dir() / "data" / "SoulChatCorpus")
    if target.is_dir() and any(target.glob("*.json*")):
        return target
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"downloading {dataset_id} needs ModelScope: `pip install modelscope`, or download it by hand "
            f"(https://modelscope.cn/datasets/{dataset_id}) and set recipe.data.path") from None
    tmp = target.with_name(target.name + ".part")
    snapshot_download(dataset_id, repo_type="dataset", local_dir=str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def download_covid(target: str | Path | None = None, repo: str = COVID_REPO,
                   files: tuple[str, ...] = ("train_data.json", "validate_data.json", "test_data.json")) -> Path:
    """Clone UCSD-AI4H/COVID-Dialogue and collect the Chinese split files into ``target``."""
    target = Path(target or cache_dir() / "data" / "COVID-Dialogue")
    if all((target / f).exists() for f in files):
        return target
    clone = cache_dir() / "data" / "COVID-Dialogue.git"
    if not clone.exists():
        subprocess.run(["git", "clone", "--depth", "1", repo, str(clone)], check=True)
    found = {f: sorted(clone.rglob(f)) for f in files}
    missing = [f for f, paths in found.items() if not paths]
    if missing:
        raise FileNotFoundError(
            f"{clone}: {', '.join(missing)} not in the clone; run the repository's src/preprocess.py on its "
            f"Chinese dialogue text to produce them, then set recipe.data.path to that folder")
    target.mkdir(parents=True, exist_ok=True)
    for f, paths in found.items():
        with atomic_path(target / f) as tmp:
            shutil.copyfile(paths[0], tmp)
    return target


def download_url(url: str, target: str | Path) -> Path:
    """One file over HTTP(S), written atomically (e.g. comparison_gpt4_data_zh.json)."""
    target = Path(target)
    if target.exists():
        return target
    with atomic_path(target) as tmp, urllib.request.urlopen(url, timeout=60) as resp:
        with open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh)
    return target
