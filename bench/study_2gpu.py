"""The study's profile for real: Mixtral-8x7B (full size, random weights) read from a checkpoint on
disk by the kit's layer-by-layer 4-bit loader, split over two GPUs each capped at 24 GiB (the
study's two RTX 3090s; ``torch.cuda.set_per_process_memory_fraction``), and trained by the kit's
trainer with ``configs/paper.yaml`` as `python -m phyassist train --config paper` would.

bench/finetune_mixtral.py measures each half of the layers alone on one GPU; this runs the two
halves as the study did, one model over two devices, through the whole loader and trainer.

    python bench/study_2gpu.py --workdir /root/mixtral --tokenizer .whl_app/mistral-v1-tokenizer --out $OUT
    python bench/study_2gpu.py --tiny --workdir /tmp/tiny --tokenizer .whl_app/mistral-v1-tokenizer  # CPU check
    python bench/study_2gpu.py --split-cpu --workdir /tmp/split --tokenizer .whl_app/mistral-v1-tokenizer --out $OUT
    python bench/study_2gpu.py --small-gpu --workdir /tmp/split --tokenizer .whl_app/mistral-v1-tokenizer --out $OUT

``--split-cpu`` is for a machine with one GPU: a small Mixtral's layers split between the GPU and the
CPU, the head on the second device as in the study's split. It runs the code paths a layer split
adds (accelerate's device hooks under the checkpointed, compiled layers, the loss and token count on
two devices, the optimizer's per-device buffers, gradient clipping over devices) through backward
and optimizer steps; it measures nothing of the study's speed or memory. ``--small-gpu`` trains the
same checkpoint on the GPU alone: the reference its losses are compared with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1, vocab_size=32000)


def memory_probe(found: dict, t0: float):
    """A TrainerCallback recording every GPU's allocated memory when training begins (the 4-bit
    weights and the adapter, before any activation)."""
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            found["weights_gib"] = [round(torch.cuda.memory_allocated(i) / GIB, 3)
                                    for i in range(torch.cuda.device_count())]
            found["layers_per_device"] = layers_per_device(kw["model"])
            found["load_s"] = round(time.perf_counter() - t0, 1)  # model + tokenizer + data prep
            print("loaded:", json.dumps(found), flush=True)

    return Probe()


def layers_per_device(model) -> dict:
    from phyassist.models.mixtral4bit.checkpointing import decoder_layers

    counts: dict = {}
    for layer in decoder_layers(model):
        dev = str(next(layer.parameters()).device)
        counts[dev] = counts.get(dev, 0) + 1
    return counts


def split_with_cpu() -> None:
    """The kit's loader places the first half of the layers (and the embeddings) on GPU 0 and the
    second half, the final norm and the head on the CPU: the study's split with the CPU as GPU 1.

    accelerate reads "cpu" in a device map as offload (weights parked on the meta device, run on
    the GPU); with the CPU as the main device its modules run where they are, as a second GPU's do.
    The Trainer's bf16 autocast covers every CUDA device but not the CPU: it is added for the CPU."""
    import functools

    import accelerate
    import torch
    import transformers

    from phyassist.models.mixtral4bit import loader
    from phyassist.models.placement import layer_device_map

    def plan(mcfg, model, quant_cfg):
        n = model.config.num_hidden_layers
        return layer_device_map(model.config, [n - n // 2, n // 2], devices=[0, "cpu"])

    loader.plan_device_map = plan
    accelerate.dispatch_model = functools.partial(accelerate.dispatch_model, main_device="cpu")
    transformers.Trainer.autocast_smart_context_manager = (
        lambda self, cache_enabled=True: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled))


def main(argv=None) -> int:
    import torch

    from bench.app_bench import _mixtral_tokenizer
    from bench.load_4bit import make_checkpoint
    from bench.trainer_gpu import records, step_clock
    from phyassist.config import load_config
    from phyassist.train.trainer import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="where the synthetic checkpoint is written (87 GiB)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of 16 x 1,024 tokens")
    ap.add_argument("--skip", type=int, default=2, help="first steps not timed (compilation, warm-up)")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--tiny", action="store_true", help="small checkpoint on the CPU (script check)")
    ap.add_argument("--split-cpu", action="store_true",
                    help="small checkpoint split between the one GPU and the CPU (the split's code paths)")
    ap.add_argument("--small-gpu", action="store_true", help="small checkpoint on one GPU (--split-cpu's reference)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if (args.split_cpu or args.small_gpu) and not cuda:
        ap.error("--split-cpu and --small-gpu need a GPU")
    small = args.tiny or args.split_cpu or args.small_gpu
    folder = Path(args.workdir) / "checkpoint"
    res: dict = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                     argv=sys.argv[1:], gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    t0 = time.perf_counter()
    if not (folder / "model.safetensors.index.json").exists():
        make_checkpoint(folder, args.layers, **(TINY if small else {}))
    res["checkpoint_s"] = round(time.perf_counter() - t0, 1)
    res["checkpoint_gib"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GIB, 2)
    print(json.dumps(res), flush=True)
    if cuda:
        for i in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), i)
            torch.cuda.reset_peak_memory_stats(i)
    over = {"output_dir": str(Path(args.workdir) / "run"), "model.name": str(folder), "model.local_files_only": True,
            "train.max_steps": args.steps, "train.save_steps": 10_000, "train.logging_steps": 1,
            "wandb.mode": "disabled"}
    if args.small_gpu:
        over.update({"model.device_map": "single", "model.num_gpus": 1})
    if not cuda:
        over.update({"model.device_map": "cpu", "model.num_gpus": 1, "model.quant.compute_dtype": "float32",
                     "train.bf16": False, "train.optim": "adamw_torch"})
    cfg = load_config("paper", over)
    if args.split_cpu:
        split_with_cpu()
    ends: list[float] = []
    found: dict = {}
    t0 = time.perf_counter()
    callbacks = [step_clock(ends)] + ([memory_probe(found, t0)] if cuda else [])
    train(cfg, train_records=records(args.steps * 16), tokenizer=_mixtral_tokenizer(args.tokenizer, "right"),
          callbacks=callbacks)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(ends, ends[1:])][args.skip - 1:]
    step_s = statistics.median(steps)
    run = Path(cfg.output_dir)
    state = json.loads((run / "checkpoints" / "trainer_state.json").read_text())
    res.update(found, train_s=round(total, 1), first_step_s=round(ends[0] - t0, 1), step_s=round(step_s, 3),
               step_times=[round(s, 3) for s in steps], tokens_per_s=round(16 * 1024 / step_s, 1),
               losses=[h["loss"] for h in state["log_history"] if "loss" in h],
               adapter=(run / "adapter" / "adapter_model.safetensors").exists(),
               cap_gib=args.cap_gib if cuda else None)
    if cuda:
        res["peak_gib"] = [round(torch.cuda.max_memory_allocated(i) / GIB, 3) for i in range(torch.cuda.device_count())]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_2gpu.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
