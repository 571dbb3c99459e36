"""Data stage speed on this machine: near-duplicate detection on 5k rows, and the whole stage on the
study's mix from the real data (``../shared/data``), timed with the study's Mixtral tokenizer.

    python bench/data_stage.py            # writes bench/data_stage.md and .json
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phyassist.config import load_config  # noqa: E402
from phyassist.data.dedup import drop_near_duplicates  # noqa: E402
from phyassist.data.records import Row  # noqa: E402
from phyassist.data.stage import prepare  # noqa: E402
from phyassist.io import atomic_write_json, atomic_write_text  # noqa: E402
from phyassist.paths import shared_data_dir  # noqa: E402


def synthetic_rows(n: int, seed: int = 0) -> list[Row]:
    """n rows of ~120 words; every 10th a one-word edit of the previous row (a near duplicate)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    rows = []
    for i in range(n):
        if i % 10 == 9:
            q = rows[-1].question.split()
            q[-1] = "edited"
            rows.append(Row("bench", " ".join(q), rows[-1].answer, f"bench:{i}"))
        else:
            rows.append(Row("bench", " ".join(rng.choices(words, k=60)), " ".join(rng.choices(words, k=60)), f"bench:{i}"))
    return rows


def main() -> None:
    res: dict = {"machine": f"{platform.platform()}, {os.cpu_count()} CPU cores",
                 "load_average_at_start": os.getloadavg()}
    rows = synthetic_rows(5000)
    t0 = time.perf_counter()
    out = drop_near_duplicates(rows, 0.9)
    res["near_dup_5000_rows_s"] = round(time.perf_counter() - t0, 2)
    res["near_dup_found"] = len(out.removed)
    res["near_dup_planted"] = 500
    shared = shared_data_dir()
    if shared is not None:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config("paper", {"data.data_dir": str(shared), "data.download": False, "output_dir": tmp})
            t0 = time.perf_counter()
            r = prepare(cfg)
            res["paper_mix_stage_s"] = round(time.perf_counter() - t0, 1)
            res["paper_mix_records"] = {"train": r["train"], "val": r["val"]}
            res["paper_mix_rows_read"] = sum(s["raw"] for s in r["report"]["sources"].values())
    res["load_average_at_end"] = os.getloadavg()
    here = Path(__file__).resolve().parent
    atomic_write_json(here / "data_stage.json", res)
    md = ["# Data stage speed", "", f"Command: `python bench/data_stage.py`  ", f"Machine: {res['machine']} "
          f"(shared with other jobs; load average {res['load_average_at_start'][0]:.1f} at start)", "",
          "| measurement | value |", "|---|---|",
          f"| near-duplicate detection, 5,000 rows x ~120 words (threshold 0.9) | {res['near_dup_5000_rows_s']} s, "
          f"found {res['near_dup_found']} of {res['near_dup_planted']} planted |"]
    if "paper_mix_stage_s" in res:
        md.append(f"| whole data stage, paper mix from ../shared/data ({res['paper_mix_rows_read']} rows read, "
                  f"Mixtral v1 tokenizer) | {res['paper_mix_stage_s']} s -> train {res['paper_mix_records']['train']}"
                  f" / val {res['paper_mix_records']['val']} |")
    atomic_write_text(here / "data_stage.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
