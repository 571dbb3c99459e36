"""The real-data result: fine-tune the embedded default (SmolLM2-135M-Instruct) on the IMHI
train mix (+ counsel-chat) with the kit's trainer, then evaluate base vs fine-tuned vs the
majority baseline on the IMHI test sets, with the kit's evaluate stage.

    python bench/real_eval.py --data DIR --test-dir DIR --out RUN_DIR [k=v overrides ...]
    python bench/real_eval.py ... --generate-only   # GPU: train + generate only; rerun without it to score

``--data`` holds ``train.jsonl``/``val.jsonl`` written by ``python -m phyassist data`` on the real
sources; overrides are config keys (``evaluate.max_new_tokens=128`` ...). Copies the table,
plot and results to ``--copy-to`` when given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data", required=True)
    ap.add_argument("--test-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--copy-to", default=None)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--generate-only", action="store_true",
                    help="train (unless done) and write the per-set CSVs, no scoring: score later on a CPU")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from phyassist.config import load_config

    over = [f"output_dir={args.out}", f"evaluate.test_dir={args.test_dir}"] + list(args.overrides)
    cfg = load_config(args.profile, over)
    out = cfg.out
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        src = Path(args.data) / f"{split}.jsonl"
        if src.exists() and not (out / "data" / src.name).exists():
            shutil.copy(src, out / "data" / src.name)
    timings = {}
    if not args.skip_train and not (out / "adapter" / "adapter_config.json").exists():
        from phyassist.train.trainer import train

        t0 = time.time()
        train(cfg)
        timings["train_s"] = round(time.time() - t0, 1)
        print(f"[real_eval] trained in {timings['train_s']} s", flush=True)
    t0 = time.time()
    if args.generate_only:
        from phyassist.evaluate.stage import generate_all
        from phyassist.evaluate.testsets import load_test_sets
        from phyassist.runinfo import write_run_info

        sets = load_test_sets(cfg)
        write_run_info(cfg)
        generate_all(cfg, sets, progress=True)
        timings["generate_s"] = round(time.time() - t0, 1)
        print(f"[real_eval] generated in {timings['generate_s']} s", flush=True)
        (out / "eval" / "generate_meta.json").write_text(json.dumps({"timings": timings, "command": " ".join(sys.argv)}, indent=2))
        return 0
    from phyassist.evaluate.stage import run_evaluation

    res = run_evaluation(cfg, progress=True)
    timings["evaluate_s"] = round(time.time() - t0, 1)
    print(Path(res["table_md"]).read_text(), flush=True)
    meta = {"timings": timings, "command": " ".join(sys.argv), "overrides": over}
    (out / "eval" / "run_meta.json").write_text(json.dumps(meta, indent=2))
    if args.copy_to:
        dst = Path(args.copy_to)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("comparison.csv", "comparison.md", "comparison.png", "results.json", "run_meta.json"):
            if (out / "eval" / name).exists():
                shutil.copy(out / "eval" / name, dst / name)
        state = out / "checkpoints" / "trainer_state.json"
        if state.exists():
            shutil.copy(state, dst / "trainer_state.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
