"""Generation speed of the 4-bit Mixtral-8x7B with the study's LoRA attached: the kit's generation path
(static KV cache, CUDA-graph decode, routed NF4 experts) side by side with today's paths, in one run.

Random weights of the full architecture, built layer by layer straight into NF4 on the GPU
(speed and memory do not depend on the values). Variants:

* ``kit-hf``: transformers ``generate`` over the kit's 4-bit experts as the training path runs them
  (every expert dequantized each step): the generation the kit had before.
* ``routed-hf``: the same ``generate``, experts reading only the routed experts' NF4 bytes.
* ``kit``: :func:`phyassist.models.generation.generate` (static cache, CUDA graphs, routed experts).
* ``kit-v2`` / ``kit-v2pair``: the same with the v2 routed kernels (issue 22; nibbles decoded through the
  16-entry code / the 256-entry pair table) for every decode step up to batch 128 (GEMV up to 4 rows,
  multi-row kernel above); prefill still dequantizes. (``kit``: the v1 GEMV up to 16 rows.)
* ``kit-prev`` / ``kit-code16`` / ``kit-last``: the kit path with the decode defaults of earlier sessions
  (``VARIANT_DECODE``), ``kit-nofuse`` with those of now; all four without the fused norms, rotary embedding and
  LoRA products in the captured step (:mod:`phyassist.models.fused_decode`).
* ``kit-fuse3``: the decode settings of now with the fused kernels of the session before only (norms, rotary
  embedding, LoRA products): ``kit-new`` vs ``kit-fuse3`` is the fused router and the attention projections' 4-bit
  GEMV.
* ``kit-new``: the kit path with the decode settings of ``--decode`` (what ``bench/decode_kernels.py
  --choose`` picks from the kernel figures; by default the experts' own defaults) and all the fused kernels.
* ``plain-hf``: bitsandbytes' ``replace_parameter_4bit`` on the fused experts, ``generate``.

Random routers spread tokens almost evenly; a trained Mixtral does not. ``--skew A`` adds a fixed
per-expert logit bias ``-A * log(rank)`` (a Zipf-like load, reported as measured shares).

``tokens_per_s`` counts the whole call, the prompts' prefill included; a serving load of long answers is paced
by the decode steps instead, so each batch's row also times the prefill alone (the same prompts, 1 new token)
and reports ``decode_tok_s`` from the difference (:func:`decode_rate`), and, for the kit's path,
``decode_tok_s_events``: the decode steps of the timed calls themselves, between CUDA events recorded after the
prefill and after the last step (``generate(step_events=)``); a prefill that drifts between the two calls (it did
on a slow host, bench/generation_mixtral.md) moves the first, not the second.

    python3 bench/generation_mixtral.py --tokenizer .gpu/mistral-v1-tokenizer --out $OUT
    python3 bench/generation_mixtral.py --variants kit,kit-v2,kit-v2pair --skew-variants kit,kit-v2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_skew import expert_shares, set_skew  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="Mixtral tokenizer folder (default: the kit's v1 copy)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", default="kit,kit-nosplit,routed-hf,kit-hf,plain-hf")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence (kit path)")
    ap.add_argument("--new-slow", type=int, default=32, help="new tokens for the slow baselines")
    ap.add_argument("--long-prompt", type=int, default=1500, help="first-token latency prompt (batch 1)")
    ap.add_argument("--skews", default="0,1.2", help="router skews to measure (0 = the random router)")
    ap.add_argument("--skew-variants", default="kit,kit-nosplit,kit-hf",
                    help="variants also measured at the other skews")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", default=None, help="JSON list of IMHI queries: evaluation projection")
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-new", type=int, default=160)
    ap.add_argument("--crossover", action="store_true", help="routed vs dequantized experts by token count")
    ap.add_argument("--decode", default="", help="kit-new's decode settings, e.g. kernel=v2,lut=code,max_rows=256 "
                    "(phyassist.models.mixtral4bit.decode.parse_decode_options)")
    ap.add_argument("--profile", default="", help="variant whose decode is profiled (kernel table, layer breakdown)")
    ap.add_argument("--profile-runs", default="1:0", help="BATCH:SKEW pairs profiled, comma-separated")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def sync():
    import torch

    torch.cuda.synchronize()


def build(method: str, layers: int, vocab: int):
    import torch

    from phyassist.config import load_config
    from phyassist.models.mixtral4bit.build import build_quantized_model
    from phyassist.models.registry import architecture_config
    from phyassist.train.lora import apply_lora

    cfg = load_config("paper")
    config = architecture_config(cfg.model.name)
    config.num_hidden_layers = layers
    config.vocab_size = vocab
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_quantized_model(config, cfg.model.quant, "cuda", method=method, progress=False).eval()
    peft = apply_lora(model, cfg.train.lora).eval()  # the study's adapter: q/k/v/o + router
    for n, p in peft.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, 0, 0.01)  # a trained adapter is not zero: its work is real
        p.requires_grad_(False)
    sync()
    return peft, round(time.perf_counter() - t0, 1)


# full token count and repeats
FAST = ("kit", "kit-nosplit", "kit-v2", "kit-v2pair", "kit-prev", "kit-code16", "kit-last", "kit-nofuse", "kit-fuse3",
        "kit-new", "kit-sdpa", "kit-before", "kit-s0", "kit-s1024", "kit-s2048", "kit-attn-all", "routed-hf")
# each variant's decode settings over DECODE_DEFAULTS (kit-new: over them, those of --decode)
VARIANT_DECODE = {
    "kit-hf": {"max_rows": 0},  # the training path's experts: every expert dequantized each step
    "kit": {"kernel": "v1", "max_rows": 16},  # the routed path as first built: the v1 GEMV
    "routed-hf": {"kernel": "v1", "max_rows": 16},
    "kit-nosplit": {"kernel": "v1", "max_rows": 16, "split_bytes": 0},  # the GEMV over all of K in one program
    # v2: GEMV up to 4 rows, multi-row kernel above, every decode step up to batch 128 routed; prefill chunks
    # (thousands of rows) still dequantize the layer once (the multi-row kernel decodes once per row tile)
    "kit-v2": {"kernel": "v2", "lut": "code", "gemv_rows": 4, "max_rows": 256},
    "kit-v2pair": {"kernel": "v2", "lut": "pair", "gemv_rows": 4, "max_rows": 256},
    # the defaults of 2026-12-01 (bench/decode_kernels.md's first choice): the routing by torch's sort, the
    # split-K partial sums added in a pass of their own
    "kit-prev": {"kernel": "v2", "lut": "code", "gemv_rows": 0, "max_rows": 128, "fuse": 0},
    # the defaults of 2026-12-02 (bench/decode_kernels.md, second choice): the code in the compute dtype looked
    # up in memory, the routing in one kernel, the partial sums added inside the SwiGLU and gather-sum
    "kit-code16": {"kernel": "v2", "lut": "code16", "gemv_rows": 0, "max_rows": 128, "fuse": 1, "prmt_rows": 0},
    # the defaults of the morning of 2026-12-02 (third choice): the same with the prmt decoding from 8 rows on,
    # no fused norms, rotary embedding and LoRA products (phyassist.models.fused_decode) in the captured step
    "kit-last": {"kernel": "v2", "lut": "code16", "gemv_rows": 0, "max_rows": 128, "fuse": 1, "prmt_rows": 8},
    # the decode defaults of now without the fused layers: what the fused kernels add is kit-new vs this
    "kit-nofuse": {},
    # the same with the fused kernels of the session before only (norms, rotary embedding, LoRA products): kit-new
    # vs this is what the fused router and the 4-bit GEMV of the attention projections add
    "kit-fuse3": {},
    # the kit now with the decode step's attention in transformers' SDPA (cuDNN), not the fused decode attention
    "kit-sdpa": {},
    # the kit as committed at 481a0f0 (the session before): SDPA, the split of K by split_bytes alone
    "kit-before": {"split_programs": 0},
    # the kit now but the split of K by split_bytes alone: what the default split_programs 1,024 adds
    "kit-s0": {"split_programs": 0},
    # the split of K chosen per call for about 1,024 / 2,048 programs (DECODE_DEFAULTS' split_programs)
    "kit-s1024": {"split_programs": 1024},
    "kit-s2048": {"split_programs": 2048},
    # the kit now with the decode attention kernel at every batch (decode_attention.MIN_PROGRAMS 0, ATTENTION_MIN)
    "kit-attn-all": {},
}
# phyassist.models.decode_attention.MIN_PROGRAMS per variant; the others get the module's default
ATTENTION_MIN = {"kit-attn-all": 0}
_MIN_PROGRAMS = None  # decode_attention.MIN_PROGRAMS as the kit sets it, read before a variant changes it
# the fused kernels (phyassist.models.fused_decode.FUSED_PARTS) each variant's captured steps get; others none
VARIANT_FUSED = {"kit-new": True, "kit-fuse3": ("norm", "rotary", "lora"), "kit-s1024": True, "kit-s2048": True,
                 "kit-attn-all": True,
                 "kit-sdpa": ("norm", "rotary", "lora", "router", "nf4"), "kit-s0": True,
                 "kit-before": ("norm", "rotary", "lora", "router", "nf4")}


def set_routed(model, variant: str, decode: dict | None = None) -> None:
    """The experts' decode settings of ``variant`` (VARIANT_DECODE, or ``decode`` for kit-new), each time from
    DECODE_DEFAULTS so that no variant inherits another's; plain-hf has no 4-bit expert modules."""
    global _MIN_PROGRAMS
    import phyassist.models.decode_attention as da
    from phyassist.models.mixtral4bit.decode import DECODE_DEFAULTS, configure_decode

    if variant != "plain-hf":
        settings = (decode or {}) if variant == "kit-new" else VARIANT_DECODE[variant]
        configure_decode(model, dict(DECODE_DEFAULTS, **settings))
        # which fused kernels the captured steps get (phyassist.models.generation reads this)
        model.phyassist_fused_decode = VARIANT_FUSED.get(variant, False)
    _MIN_PROGRAMS = da.MIN_PROGRAMS if _MIN_PROGRAMS is None else _MIN_PROGRAMS
    want = ATTENTION_MIN.get(variant, _MIN_PROGRAMS)
    if da.MIN_PROGRAMS != want:  # the captured graphs' key does not hold it: capture again
        da.MIN_PROGRAMS = want
        model.__dict__.pop("_phyassist_decoders", None)


def timed_generate(variant, model, ids, mask, new, repeats):
    import torch

    from phyassist.models.generation import generate

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=2)
    static = variant.startswith("kit") and variant != "kit-hf"
    events: list = []
    call = ((lambda: generate(model, ids, mask, step_events=events, **kw)) if static
            else (lambda: model.generate(input_ids=ids, attention_mask=mask, **kw)))
    with torch.inference_mode():
        warm = dict(kw, max_new_tokens=min(new, 4), min_new_tokens=min(new, 4))
        # warm-up (graphs captured, kernels tuned): same cache-length bucket, fewer tokens
        generate(model, ids, mask, **warm) if static else model.generate(input_ids=ids, attention_mask=mask, **warm)
        sync()
        times, steps = [], []
        for _ in range(repeats):
            events.clear()
            t0 = time.perf_counter()
            out = call()
            sync()
            times.append(time.perf_counter() - t0)
            if len(events) > 1:  # the decode steps of this very call, on the GPU's clock
                steps.append(events[0].elapsed_time(events[-1]) / 1e3)
    assert out.shape[1] == ids.shape[1] + new, out.shape
    return times, steps


def decode_rate(batch: int, new: int, total_s: float, prefill_s: float) -> float | None:
    """Tokens/s of the decode steps alone: the whole-call figure mixes in the prefill of the 512-token prompts,
    which weighs most at large batches and short outputs and hides how fast each step runs. The call of
    ``new`` tokens is the prefill, the first token (picked from the prefill's logits) and ``new - 1`` decode
    steps; a call of 1 token is the prefill and that first token, so the difference of the two is the decode
    steps. None where there is no step (``new <= 1``) or timing noise leaves no time for them."""
    steps_s = total_s - prefill_s
    if new <= 1 or steps_s <= 0:
        return None
    return round(batch * (new - 1) / steps_s, 1)


def prompts(tok, n, length, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, tok.vocab_size - 1, (n, length), generator=g).cuda()


def save(res, rows=()):
    """The results so far (a run cut short by its time limit still leaves them)."""
    Path(res["out"]).write_text(json.dumps(dict(res, rows=res["rows"] + list(rows)), indent=1))


def run_variant(variant, model, tok, args, skew, res):
    import torch

    repeats = args.repeats if variant in FAST else max(1, args.repeats - 1)
    set_routed(model, variant, args.decode_options)
    set_skew(model, skew)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        new = args.new if variant in FAST else args.new_slow
        ids = prompts(tok, b, args.prompt_len)
        mask = torch.ones_like(ids)
        times, steps = timed_generate(variant, model, ids, mask, new, repeats)
        med = statistics.median(times)
        shares = expert_shares(model)  # before the prefill call below, whose forward would replace them
        # the same prompts, 1 new token: the prefill (and first token) alone, for the decode rate; with the
        # default lengths (p + 1 and p + new in one 256-token bucket) it reuses the call's own static cache
        prefill, _ = timed_generate(variant, model, ids, mask, 1, repeats)
        pre = statistics.median(prefill)
        rows.append(dict(variant=variant, skew=skew, batch=b, prompt=args.prompt_len, new_tokens=new,
                         seconds=[round(t, 4) for t in times], median_s=round(med, 4),
                         tokens_per_s=round(b * new / med, 1),
                         prefill_seconds=[round(t, 4) for t in prefill], prefill_median_s=round(pre, 4),
                         decode_tok_s=decode_rate(b, new, med, pre), expert_share=shares))
        if steps:  # the decode steps timed inside each call (CUDA events): no second call whose prefill may drift
            rows[-1].update(step_seconds=[round(t, 4) for t in steps],
                            decode_tok_s_events=decode_rate(b, new, statistics.median(steps), 0.0))
        print(json.dumps(rows[-1]), flush=True)
        save(res, rows)
        torch.cuda.empty_cache()
    ids = prompts(tok, 1, args.long_prompt, seed=1)
    ttft, _ = timed_generate(variant, model, ids, torch.ones_like(ids), 1, repeats)
    rows.append(dict(variant=variant, skew=skew, batch=1, prompt=args.long_prompt, new_tokens=1,
                     seconds=[round(t, 4) for t in ttft], first_token_s=round(statistics.median(ttft), 4)))
    print(json.dumps(rows[-1]), flush=True)
    res["rows"].extend(rows)


def crossover(model, res):
    """Experts alone: routed NF4 kernel vs the dequantize-all path, by token count."""
    import torch

    ex = next(m for m in model.modules() if hasattr(m, "decode_max_rows"))
    out = []
    for t in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(t, ex.hidden_dim, device="cuda", dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(ex.num_experts, device="cuda")[:2] for _ in range(t)])
        w = torch.full((t, 2), 0.5, device="cuda")
        row = {"tokens": t}
        for name, rows, split in (("gemv", 10 ** 9, 512), ("gemv_whole_k", 10 ** 9, 0), ("dequantized", 0, 512)):
            if name.startswith("gemv") and t > 32:
                continue  # one program per row rereads the weights per row: known slow past a few rows
            ex.decode_max_rows, ex.decode_split_bytes, ex.decode_kernel = rows, split, "v1"
            with torch.inference_mode():
                for _ in range(3):
                    ex(x, idx, w)
                sync()
                t0 = time.perf_counter()
                for _ in range(20):
                    ex(x, idx, w)
                sync()
            row[f"{name}_ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
        print(json.dumps(row), flush=True)
        out.append(row)
        res["crossover"] = out
        save(res)
    ex.decode_max_rows, ex.decode_split_bytes = 16, 512
    res["crossover"] = out


def eval_projection(model, tok, args, res):
    """The evaluation stage's generation on real IMHI queries, old path vs new, projected to 6,057."""
    import torch

    from phyassist.evaluate.generate import chat_prompts, generate_batched

    queries = json.loads(Path(args.queries).read_text())[: args.eval_n]
    ps = chat_prompts(tok, queries)
    out = {}
    kit = [v for v in ("kit-new", "kit-before", "kit-fuse3", "kit-last", "kit-code16", "kit-prev", "kit")
           if v in args.variants.split(",")]
    for variant in kit + ["kit-hf"]:
        set_routed(model, variant, args.decode_options)
        set_skew(model, 0.0)
        static = variant != "kit-hf"
        t0 = time.perf_counter()
        texts = generate_batched(model, tok, ps, max_new_tokens=args.eval_new, batch_size=args.eval_batch,
                                 progress=False, static=static, min_new_tokens=args.eval_new)
        sync()
        s = time.perf_counter() - t0
        out[variant] = dict(queries=len(ps), seconds=round(s, 2), projected_6057_s=round(s / len(ps) * 6057, 0))
        print(variant, json.dumps(out[variant]), flush=True)
        res["eval_projection"] = out
        save(res)
        torch.cuda.empty_cache()
    res["eval_projection"] = out


def save_events(events, path: Path) -> str:
    """The trace's kernels, compactly (``names``: each kernel name once; ``events``: ``[name index, start us,
    duration us]`` in start order): kept where the breakdown fails, to find why and rerun it on the file
    (bench/kernel_timeline.py) without the GPU."""
    names = sorted({e[0] for e in events})
    index = {n: i for i, n in enumerate(names)}
    rows = [[index[n], round(ts, 3), round(d, 3)] for n, ts, d in events]
    path.write_text(json.dumps({"names": names, "events": rows}))
    return path.name


def profile_decode(model, tok, args, res, batch: int = 1, skew: float = 0.0, new: int = 16) -> None:
    """Where a decode step's time goes: torch.profiler over one ``generate`` call of ``new`` tokens (512-token
    prompts, ``batch`` of them, router skew ``skew``, after a warm-up call): kernels by total GPU time, and the
    captured steps kernel by kernel, by place in the layer (bench/kernel_timeline.py)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kernel_timeline import decode_steps, format_breakdown, kernel_events, layer_breakdown
    from phyassist.models.generation import generate

    set_routed(model, args.profile, args.decode_options)
    set_skew(model, skew)
    ids = prompts(tok, batch, args.prompt_len)
    # no every-8-step check (it adds a kernel to some steps): every step runs the same kernels
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=2,
              sync_every=10 ** 9)
    with torch.inference_mode():
        generate(model, ids, torch.ones_like(ids), **kw)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(model, ids, torch.ones_like(ids), **kw)
            sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    name = f"profile_decode_b{batch}_s{skew:g}"
    out_dir = Path(res["out"]).parent
    trace = out_dir / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    entry = {"variant": args.profile, "batch": batch, "skew": skew, "shares": expert_shares(model),
             "prompt": args.prompt_len, "new_tokens": new, "table": table}
    events: list = []
    try:  # the breakdown must not cost the table
        events = kernel_events(trace)  # read once: the trace is tens of MB
        # a step holds every layer (at batch 1 fewer steps than layers are profiled); sampling's eager kernels
        # between replays may change variant from step to step (bench/kernel_timeline.py)
        steps = decode_steps(events, new - 1, min_period=2 * args.layers, max_mismatch=4)
        entry["breakdown"] = layer_breakdown(steps, args.layers)
        table += "\n\n" + format_breakdown(entry["breakdown"], f"{args.profile}, batch {batch}, skew {skew:g}, "
                                            f"expert shares {entry['shares']}: the captured decode steps")
    except ValueError as exc:
        entry["breakdown_error"] = str(exc)
        entry["events_file"] = save_events(events, out_dir / f"{name}_events.json")
    finally:
        trace.unlink()  # tens of MB; the breakdown keeps what it says
    res.setdefault("profiles", []).append(entry)
    (out_dir / f"{name}.txt").write_text(table)
    print(table, flush=True)
    save(res)


def main(argv=None) -> int:
    import torch

    from phyassist.models.mixtral4bit.decode import parse_decode_options

    args = parse(argv)
    args.decode_options = parse_decode_options(args.decode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from app_bench import _mixtral_tokenizer, _provenance

    tok = _mixtral_tokenizer(args.tokenizer, "left")
    res = {"command": " ".join(sys.argv), "provenance": _provenance(), "device": torch.cuda.get_device_name(0),
           "decode": args.decode_options,
           "out": str(out / "generation_mixtral.json"),
           "torch": torch.__version__, "rows": [], "build_s": {}}
    variants = args.variants.split(",")
    kit = [v for v in variants if v != "plain-hf"]
    if kit:
        model, res["build_s"]["grouped"] = build("grouped", args.layers, tok.vocab_size)
        res["weights_gib"] = round(torch.cuda.memory_allocated() / 2 ** 30, 2)
        if args.crossover:
            crossover(model, res)
        for skew in [float(s) for s in args.skews.split(",")]:
            for v in [v for v in kit if skew == 0 or v in args.skew_variants.split(",")]:
                torch.cuda.reset_peak_memory_stats()
                run_variant(v, model, tok, args, skew, res)
                res.setdefault("peak_gib", {})[f"{v}@{skew}"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        for run in filter(None, args.profile_runs.split(",") if args.profile else []):
            batch, _, skew = run.partition(":")
            try:  # a profiler failure must not cost the measurements after it
                profile_decode(model, tok, args, res, int(batch), float(skew or 0))
            except Exception as exc:  # noqa: BLE001 - recorded in the results
                res.setdefault("profiles", []).append({"variant": args.profile, "batch": batch, "skew": skew,
                                                       "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print("profile failed:", res["profiles"][-1]["error"], flush=True)
        if args.queries:
            eval_projection(model, tok, args, res)
        del model
        torch.cuda.empty_cache()
    if "plain-hf" in variants:
        model, res["build_s"]["parametrize"] = build("parametrize", args.layers, tok.vocab_size)
        run_variant("plain-hf", model, tok, args, 0.0, res)
    save(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
