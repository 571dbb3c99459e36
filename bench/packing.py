"""Padding-free packing against plain padding: the same records, one epoch each, same model.

Trains the configured model (default: the embedded SmolLM2-135M-Instruct, smoke profile) twice
with the kit's trainer on the first ``--records`` training records, once with
``train.packing=false`` (batches padded to their longest example) and once with
``train.packing=true`` (TRL's ``bfd`` packing, padding-free: position ids restart per example,
so examples never attend to each other; tests/test_train_checks.py). Reports wall time,
optimizer steps, answer tokens per second and the final training loss of each.

    python bench/packing.py --data DIR --out DIR [--records 2000] [k=v overrides ...]

``--data`` holds ``train.jsonl`` from ``python -m phyassist data`` (e.g. on the real IMHI mix).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(profile, records, mode, out, overrides):
    from phyassist.config import load_config
    from phyassist.train.trainer import train

    over = [f"output_dir={out / mode}", f"train.packing={'true' if mode == 'packing' else 'false'}",
            "train.max_steps=-1", "train.num_train_epochs=1", "train.eval_steps=null", "train.save_steps=100000",
            "train.resume=false", "train.group_by_length=false", "wandb.mode=disabled"] + list(overrides)
    cfg = load_config(profile, over)
    t0 = time.perf_counter()
    train(cfg, train_records=records, eval_records=[], output_dir=out / mode)
    wall = time.perf_counter() - t0
    state = json.loads((out / mode / "checkpoints" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    tokens = state.get("num_input_tokens_seen") or 0
    # wall time of the whole train() call (model load included, the same for both modes)
    return dict(mode=mode, steps=state["global_step"], wall_s=round(wall, 1),
                tokens_seen=tokens, tokens_per_s=round(tokens / wall, 1) if tokens else None,
                final_loss=logs[-1]["loss"] if logs else None,
                batch=cfg.train.per_device_train_batch_size, max_len=cfg.model.max_seq_length)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from phyassist.io import read_jsonl

    records = list(read_jsonl(Path(args.data) / "train.jsonl"))[:args.records]
    out = Path(args.out)
    rows = [run(args.profile, records, mode, out, args.overrides) for mode in ("padding", "packing")]
    pad, pack = rows
    meta = dict(records=len(records), data=str(args.data), profile=args.profile, overrides=args.overrides,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M %Z"), argv=sys.argv[1:],
                speedup=round(pad["wall_s"] / pack["wall_s"], 2))
    (out / "packing.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(json.dumps(meta))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
