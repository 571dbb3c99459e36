"""The kit's own trainer (`phyassist.train.trainer.train`: TRL SFT, paged AdamW 32-bit, batch 4 x
accumulation 4, group_by_length) on a full-size random Mixtral-8x7B in 4 bit, per training recipe.

bench/finetune_mixtral.py times a bare training step; this runs what `python -m phyassist train
--config single-gpu` runs, with the model built straight into 4 bit (no checkpoint can be
downloaded) and passed in, and Mixtral's tokenizer. Records are synthetic text cut at the
profile's 1,024 tokens, so every micro-batch is 4 x 1024 tokens, as the study's.

Recipes (overrides of configs/single-gpu.yaml):
  plain     experts_method=parametrize, whole-layer gradient checkpointing
  grouped   the kit's 4-bit experts, attention-only checkpointing, eager
  compiled  the same with train.compile_attention
  budget    compiled, attention not checkpointed: the compiler recomputes within
            train.attention_memory_budget=0.1
  flat      compiled, with train.flat_optimizer (configs/paper.yaml's setting)
  flat-budget  flat, attention not checkpointed: train.attention_memory_budget=0.02
  fast      flat without any checkpointing (train.gradient_checkpointing=false, compile_attention):
            one 80 GB GPU's fastest recipe
  flat-grouped, fast-grouped  with model.quant.expert_gemm=grouped (torch's grouped GEMM)
  <recipe>+sync  the same with TRL's per-micro-batch metric reads (the trainer's defer_metrics off)

    python bench/trainer_gpu.py --tokenizer .whl_app/mistral-v1-tokenizer --out /root/out/trainer
    python bench/trainer_gpu.py ... --vary          # records of many lengths: compile and recompile times
    python bench/trainer_gpu.py ... --profile flat  # kernels, CPU ops and GPU idle of the last step
    python bench/trainer_gpu.py --from-json bench/trainer_gpu.json  # its table again, from the raw JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {
    "plain": {"model.quant.experts_method": "parametrize", "train.gradient_checkpointing": True,
              "train.compile_attention": False},
    "grouped": {"model.quant.experts_method": "grouped", "train.gradient_checkpointing": "attention",
                "train.compile_attention": False},
    "compiled": {"model.quant.experts_method": "grouped", "train.gradient_checkpointing": "attention",
                 "train.compile_attention": True},
    "budget": {"model.quant.experts_method": "grouped", "train.gradient_checkpointing": "attention",
               "train.compile_attention": True, "train.attention_memory_budget": 0.1},
    "flat": {"model.quant.experts_method": "grouped", "train.gradient_checkpointing": "attention",
             "train.compile_attention": True, "train.flat_optimizer": True},
    "flat-budget": {"model.quant.experts_method": "grouped", "train.gradient_checkpointing": "attention",
                    "train.compile_attention": True, "train.flat_optimizer": True,
                    "train.attention_memory_budget": 0.02},
    "fast": {"model.quant.experts_method": "grouped", "train.gradient_checkpointing": False,
             "train.compile_attention": True, "train.flat_optimizer": True},
}
# the same with torch's grouped GEMM for the experts instead of one cuBLAS GEMM per expert
RECIPES.update({f"{name}-grouped": {**RECIPES[name], "model.quant.expert_gemm": "grouped"} for name in ("flat", "fast")})
# configs/single-gpu.yaml saves 8 layers' dequantized experts for the backward; only the fast
# recipes (nothing recomputed, 80 GB) keep that, "fast-keep0" is fast without it
RECIPES = {name: over if name.startswith("fast") else {**over, "model.quant.keep_dequantized_layers": 0}
           for name, over in RECIPES.items()}
RECIPES["fast-keep0"] = {**RECIPES["fast"], "model.quant.keep_dequantized_layers": 0}
WORDS = ("feel anxious sleep work family friend therapy week talk worry tired hope stress mood help "
         "night day change thought plan better listen support small step together notice breathe").split()


def records(n: int, seed: int = 0, vary: bool = False) -> list[dict]:
    """Prompt/answer pairs long enough that every record is cut at 1,024 tokens (answer kept);
    ``vary``: answers of 50-1,400 words instead, so micro-batches come in many lengths."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": f"[INST] {text(200)} [/INST]", "completion": text(rng.randint(50, 1400) if vary else 1400)}
            for _ in range(n)]


def step_clock(ends: list[float]):
    """A TrainerCallback appending the wall time at the end of every optimizer step (after a sync)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    return StepClock()


def step_profiler(step: int, found: dict):
    """A TrainerCallback profiling optimizer step ``step`` (all its micro-batches): the top CUDA
    kernels and CPU ops into ``found["table"]``, GPU idle time by what it waited for into
    ``found["gpu_idle"]`` (the analysis of bench/finetune_mixtral.py's --timeline)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from bench.finetune_mixtral import idle_breakdown

    class StepProfiler(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == step and torch.cuda.is_available():
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == step:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                avg = self.prof.key_averages()
                found["table"] = (avg.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
                                  + avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
                found["gpu_idle"] = idle_breakdown(self.prof)
                self.prof = None

    return StepProfiler()


def run(recipe: str, args, tokenizer) -> dict:
    import torch

    cuda = torch.cuda.is_available()

    from bench.app_bench import random_model_factory
    from phyassist.config import load_config
    from phyassist.train import trainer as T

    name, _, flag = recipe.partition("+")
    if flag not in ("", "sync"):
        raise SystemExit(f"{recipe}: unknown suffix +{flag} (only +sync)")
    out = Path(tempfile.mkdtemp(prefix=f"trainer-{name}-"))
    over = {"output_dir": str(out), "train.max_steps": args.steps, "train.save_steps": 10_000,
            "train.logging_steps": 1, "train.check_memory": False, "wandb.mode": "disabled",
            "model.name": args.model, **RECIPES[name]}
    if not cuda:
        over.update({"model.device_map": "cpu", "model.quant.compute_dtype": "float32", "train.bf16": False})
    cfg = load_config("single-gpu", over)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log: dict = {}
    model = random_model_factory(len(tokenizer), torch.device("cuda" if cuda else "cpu"), log)(cfg.model)
    weights = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    ends: list[float] = []
    found: dict = {}
    callbacks = [step_clock(ends)]
    if recipe in args.profile.split(","):
        callbacks.append(step_profiler(args.steps, found))  # the last step, left out of the timing
    from torch._dynamo.utils import counters

    counters.clear()
    make = T.trainer_class
    if flag == "sync":
        T.trainer_class = lambda: type("SyncingTrainer", (make(),), {"defer_metrics": False})
    t0 = time.perf_counter()
    try:
        T.train(cfg, train_records=records(args.steps * 16, vary=args.vary), model=model, tokenizer=tokenizer,
                callbacks=callbacks)
    finally:
        T.trainer_class = make
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    steps = [b - a for a, b in zip(ends, ends[1:])][args.skip - 1:]  # after compile/warm-up
    if found:
        steps = steps[:-1]
    step_s = statistics.median(steps)
    state = json.loads((out / "checkpoints" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    row = dict(recipe=recipe, overrides=RECIPES[name], weights_gib=round(weights, 2), peak_gib=round(peak, 2),
               first_step_s=round(ends[0] - t0, 1), step_s=round(step_s, 3),
               step_times=[round(s, 3) for s in steps],
               all_step_times=[round(b - a, 3) for a, b in zip([t0] + ends, ends)],
               compiled_graphs=counters["stats"]["unique_graphs"],
               tokens_per_s=None if args.vary else round(16 * 1024 / step_s, 1),
               train_s=round(total, 1), losses=losses, build_s=log.get("build_s"),
               adapter=(out / "adapter" / "adapter_model.safetensors").exists(), gpu_idle=found.get("gpu_idle"))
    if "table" in found:
        (Path(args.out) / f"trainer_profile_{recipe.replace('+', '_')}.txt").write_text(found["table"])
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


TOKENS_PER_STEP = 16 * 1024  # batch 4 x accumulation 4, every record cut at 1,024 tokens


def recompute(path) -> dict:
    """One raw JSON of this script with its figures derived again from the timed optimizer steps it
    keeps (``step_times``): the true median (``statistics.median``), tokens/s, MFU (as
    bench/finetune_mixtral.py counts it: flops_per_token of Mixtral-8x7B at 1,024 tokens over the
    GPU's dense bf16 peak) and "vs plain" against the file's first plain pass, as ``main`` writes
    it. ``step_s`` of the JSON is kept as ``recorded_s``: the runs of 2026-11-24 recorded the upper
    median (``sorted(t)[n // 2]``) of their four timed steps."""
    from bench.finetune_mixtral import flops_per_token, mixtral_config, peak_flops

    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    fpt = flops_per_token(mixtral_config(False), 1024)
    peak = peak_flops(meta["device"])
    rows = []
    for r in data["rows"]:
        if "error" in r:
            continue
        med = statistics.median(r["step_times"])
        tps = TOKENS_PER_STEP / med if r.get("tokens_per_s") else None  # None: --vary, lengths differ
        rows.append(dict(recipe=r["recipe"], peak_gib=r["peak_gib"], times=r["step_times"], steps=len(r["step_times"]), median_s=med,
                         recorded_s=r["step_s"], tokens_per_s=tps, mfu=tps * fpt / peak if tps else None,
                         losses=r["losses"]))
    base = next((r["tokens_per_s"] for r in rows if r["recipe"] == "plain" and r["tokens_per_s"]), None)
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / base if base and r["tokens_per_s"] else None
    return dict(path=str(path), date=meta["date"], device=meta["device"], argv=meta["argv"], rows=rows)


def report(paths) -> str:
    """Markdown tables of the raw JSONs ``paths``, one per file, then each recipe pooled over them all."""
    from bench.finetune_mixtral import flops_per_token, mixtral_config, peak_flops

    lines, pool = [], {}
    runs = [recompute(p) for p in paths]
    for run in runs:
        for r in run["rows"]:
            if r["tokens_per_s"]:
                g = pool.setdefault(r["recipe"], dict(times=[], passes=[], peak=peak_flops(run["device"])))
                g["times"] += r["times"]
                g["passes"].append(r["median_s"])
    for run in runs:
        lines += [f"{run['path']}: {run['date']}, {run['device']}, {TOKENS_PER_STEP:,} tokens an optimizer step",
                  f"argv: {' '.join(run['argv'])}", "",
                  "| recipe | peak GiB | steps | median s | recorded s | tokens/s | MFU | vs plain | last loss |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in run["rows"]:
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "-"
            rel = f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-"
            loss = f"{r['losses'][-1]:.4f}" if r["losses"] else "-"
            lines.append(f"| {r['recipe']} | {r['peak_gib']:.2f} | {r['steps']} | {r['median_s']:.4f} | "
                         f"{r['recorded_s']:.3f} | {tps} | {mfu} | {rel} | {loss} |")
        lines.append("")
    fpt = flops_per_token(mixtral_config(False), 1024)
    lines += ["pooled over the files above (true median of all timed steps):", "",
              "| recipe | steps | pooled median s | tokens/s | MFU | passes (median s) |", "|---|---:|---:|---:|---:|---|"]
    for recipe, g in pool.items():
        med = statistics.median(g["times"])
        lines.append(f"| {recipe} | {len(g['times'])} | {med:.4f} | {TOKENS_PER_STEP / med:,.0f} | "
                     f"{100 * TOKENS_PER_STEP / med * fpt / g['peak']:.1f} % | {', '.join(f'{m:.4f}' for m in g['passes'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-json", nargs="+", metavar="JSON", default=None,
                    help="only print the tables of these raw JSONs, recomputed from their step times (no GPU)")
    ap.add_argument("--recipes", default="plain,compiled,flat")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (16 sequences of 1,024 tokens each)")
    ap.add_argument("--skip", type=int, default=2, help="first steps not timed (compilation, warm-up)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--model", default="mixtral-8x7b-instruct", help="registry name (tiny-mixtral: CPU check)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--vary", action="store_true", help="records of many lengths (times the recompilation that "
                    "group_by_length batches of new lengths cause); tokens/s is then not reported")
    ap.add_argument("--profile", default="", help="recipes whose last optimizer step is profiled, not timed "
                    "(kernels, CPU ops, GPU idle time): trainer_profile_<recipe>.txt and the row's gpu_idle")
    args = ap.parse_args(argv)
    if args.from_json:  # no GPU, no tokenizer: the tables of committed raw JSONs
        print(report(args.from_json))
        return 0
    import torch

    from bench.app_bench import _mixtral_tokenizer

    tok = _mixtral_tokenizer(args.tokenizer, "right")
    rows = []
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                argv=sys.argv[1:])
    for recipe in args.recipes.split(","):
        try:
            rows.append(run(recipe, args, tok))
        except Exception as exc:  # keep the other recipes' numbers
            rows.append(dict(recipe=recipe, error=f"{type(exc).__name__}: {str(exc)[:400]}"))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r.get("recipe") == "plain" and "error" not in r), None)
    # each recipe against the first plain pass
    for r in rows:
        if base and "error" not in r and r["tokens_per_s"]:
            r["vs_plain"] = round(r["tokens_per_s"] / base, 3)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "trainer_gpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    for r in rows:
        print(f"{r['recipe']:<10}" + (f" weights {r['weights_gib']:6.2f} GiB  peak {r['peak_gib']:6.2f} GiB  "
                                      f"{r['step_s']:6.3f} s/step  {r['tokens_per_s'] or float('nan'):8.0f} tok/s  "
                                      f"x{r.get('vs_plain', float('nan')):.2f}" if "error" not in r else " " + r["error"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
