"""Mixtral-8x7B QLoRA training step on one GPU: memory and speed of the expert paths side by side.

Random weights of the full architecture (32 layers, full width), built layer by layer straight
into 4-bit NF4 (87 GiB of bf16 fits no GPU). The study's LoRA (r=32 on q/k/v/o + router) is
attached and a training step at the study's micro-batch (4 x 1024) is timed.

Variants (one process, one after the other, each model freed before the next is built):
  plain        bitsandbytes replace_parameter_4bit on the fused experts, transformers' experts
               code (torch._grouped_mm), stock loss, whole-layer gradient checkpointing
  fused        our Quant4bitExperts (one autograd node per expert block: grouped GEMMs, fused
               Triton SwiGLU with the routing weight folded in, gathers instead of scatter-adds,
               no down-projection recompute), chunked fused cross-entropy, whole-layer checkpointing
  fused-attn   fused, checkpointing of the attention halves only; the experts keep only their
               input and recompute their gate/up GEMM (memory of whole-layer checkpointing)
  fused-attn-stockce  fused-attn with transformers' loss (what the fused loss is worth)
  fused-nockpt fused without checkpointing, gate/up activations kept (most memory, fastest)
  *-bf16lora   the same with the LoRA weights in bf16 (as the QLoRA paper's code; PEFT's default
               is fp32 adapters, so every LoRA input is cast to fp32 and back)
  fused-cattn-bf16lora  fused-attn-bf16lora with each layer's attention half torch.compiled (one
               graph for all layers) and TRL's loss: what configs/paper.yaml trains with
  fused-cbudget-bf16lora  compiled attention half not checkpointed; the compiler's partitioner
               recomputes within an activation memory budget (``+budget0.1``)
  fused-cexperts-bf16lora / fused-cnockpt-bf16lora  compiled, attention not checkpointed (experts
               recompute gate/up, or keep them too)
  +keepN       suffix: N layers keep their attention activations, the others are checkpointed
  +keepwN      suffix: the last N layers' experts save their dequantized weights for the backward
               instead of dequantizing them again (model.quant.keep_dequantized_layers)
  +flat        suffix: the optimizer updates all LoRA tensors in one call (train.flat_optimizer)
  +nodrop      suffix: LoRA dropout 0 (a diagnostic: what the study's dropout costs)
  +fallbackrandom  suffix: inductor draws random numbers with aten's generator (torch._inductor.config.fallback_random)
  +perexpert  suffix: the 4-bit experts run one cuBLAS GEMM per expert instead of torch's grouped GEMM
  +autotune    suffix: the attention half compiled with mode max-autotune-no-cudagraphs
  +stalecounts suffix (a diagnostic, with +perexpert): each layer reuses the expert row counts its
               router gave in the first step instead of waiting for them, so no step after the
               first syncs with the device; the same batch every step keeps the shapes (what the
               per-layer wait costs, not a correct training path)
  half0/half1  the 2 x 24 GB profile: each half of the layers (embeddings on the first, head on
               the second) alone under a 24 GiB cap (torch.cuda.set_per_process_memory_fraction)

MFU = (4 x active parameters + 6 x layers x hidden x seq) FLOPs per token x tokens/s / peak,
active parameters = attention + router + 2 of 8 experts per layer + LM head; 4 = forward (2) +
input-gradient backward (2), the frozen weights get no weight gradient; causal attention counted
as half of the full score/value products, forward + 2 x backward. Peak: dense bf16 of the GPU
(H100 SXM 989.4 TFLOP/s; the measured cuBLAS ceiling is printed too).

--accum N times N micro-batches per optimizer step (the study: 4); --timeline breaks one step's
GPU idle time down by the CPU region it waited for and lists host-device syncs by source line;
the NF4 dequantization kernel is compared with bitsandbytes' on one layer's gate/up experts.

    python bench/finetune_mixtral.py                      # GPU, full size
    python bench/finetune_mixtral.py --tiny --steps 2     # CPU check of the script
    python bench/finetune_mixtral.py --from-json bench/finetune_mixtral.json   # its tables again, from the raw JSON
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fused_loss import fused_linear_cross_entropy  # noqa: E402
from bench.router_skew import expert_shares, set_skew  # noqa: E402
from phyassist.models.mixtral4bit.build import build_quantized_model  # noqa: E402
from phyassist.models.mixtral4bit.experts import keep_dequantized_weights  # noqa: E402
from phyassist.models.schema import QuantConfig  # noqa: E402
from phyassist.train.lora import apply_lora, trainable_parameters  # noqa: E402
from phyassist.train.schema import LoraConfig  # noqa: E402

GIB = 2**30
PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
VARIANTS = {
    "plain": dict(method="parametrize", fused_ce=False, ckpt="full"),
    "fused": dict(method="grouped", fused_ce=True, ckpt="full"),
    "fused-attn": dict(method="grouped", fused_ce=True, ckpt="attention"),
    "fused-attn-stockce": dict(method="grouped", fused_ce=False, ckpt="attention"),
    "fused-nockpt": dict(method="grouped", fused_ce=True, ckpt="none"),
    "fused-attn-bf16lora": dict(method="grouped", fused_ce=True, ckpt="attention", lora_dtype="bfloat16"),
    "fused-nockpt-bf16lora": dict(method="grouped", fused_ce=True, ckpt="none", lora_dtype="bfloat16"),
    "fused-cattn-bf16lora": dict(method="grouped", fused_ce=False, ckpt="attention", lora_dtype="bfloat16",
                                 compile=True),
    "fused-cexperts-bf16lora": dict(method="grouped", fused_ce=False, ckpt="experts", lora_dtype="bfloat16",
                                    compile=True),
    "fused-cattn-bf16lora-bnbdq": dict(method="grouped", fused_ce=False, ckpt="attention", lora_dtype="bfloat16",
                                       compile=True, dequant="bitsandbytes"),
    "fused-cbudget-bf16lora": dict(method="grouped", fused_ce=False, ckpt="experts", lora_dtype="bfloat16",
                                   compile=True, memory_budget=0.1),
    "fused-cnockpt-bf16lora": dict(method="grouped", fused_ce=False, ckpt="none", lora_dtype="bfloat16",
                                   compile=True),
}


def variant_spec(name: str) -> dict:
    """``name`` from VARIANTS, with any of the suffixes ``+keepN`` (N layers keep their attention
    activations, the others stay checkpointed), ``+budgetX`` (the compiler's activation memory
    budget X), ``+flat`` (one optimizer call over a flat view of the LoRA tensors) and ``+skewA`` (a Zipf-like
    router load, bench/router_skew.py)."""
    base, *extras = name.split("+")
    spec = dict(VARIANTS[base])
    for extra in extras:
        if extra.startswith("keepw"):  # model.quant.keep_dequantized_layers=N
            spec["keep_weights"] = int(extra[5:])
        elif extra.startswith("keep"):
            spec["attn_keep"] = int(extra[4:])
        elif extra.startswith("budget"):
            spec["memory_budget"] = float(extra[6:])
        elif extra == "flat":
            spec["flat"] = True
        elif extra == "nodrop":
            spec["lora_dropout"] = 0.0
        elif extra == "fallbackrandom":
            spec["fallback_random"] = True
        elif extra == "autotune":
            spec["compile_mode"] = "max-autotune-no-cudagraphs"
        elif extra == "stalecounts":
            spec["stale_counts"] = True
        elif extra.startswith("skew"):  # router logit bias -A * log(rank): a trained router's uneven load
            try:
                spec["skew"] = float(extra[4:])
            except ValueError:
                raise ValueError(f"variant suffix +{extra} in {name!r}: +skewA takes a number, e.g. +skew1.2") from None
        elif extra == "perexpert":  # model.quant.expert_gemm=per_expert (configs/single-gpu.yaml); without: grouped
            spec["expert_gemm"] = "per_expert"
        else:
            raise ValueError(f"unknown variant suffix +{extra} in {name!r}")
    return spec


def mixtral_config(tiny: bool, layers: int | None = None):
    from phyassist.models.registry import architecture_config

    cfg = architecture_config("tiny-mixtral" if tiny else "mixtral-8x7b-instruct")
    if layers:
        cfg.num_hidden_layers = layers
    cfg._attn_implementation = "sdpa"
    return cfg


def active_params(cfg) -> int:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    attn = h * (2 * h + 2 * kv)
    experts = cfg.num_experts_per_tok * 3 * h * i
    return cfg.num_hidden_layers * (attn + experts + cfg.num_local_experts * h) + cfg.vocab_size * h


def flops_per_token(cfg, seq: int) -> float:
    return 4 * active_params(cfg) + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq


def peak_flops(device: str) -> float:
    """Dense bf16 peak of a GPU named ``device`` (nan when not in PEAKS)."""
    return next((v for k, v in PEAKS.items() if k in device), float("nan"))


def gpu_peak() -> tuple[str, float]:
    if not torch.cuda.is_available():
        return "cpu", float("nan")
    name = torch.cuda.get_device_name()
    return name, peak_flops(name)


def check_experts(dev, tokens: int = 4096) -> dict:
    """One full-width expert block: our fused path against transformers' experts code on the same
    dequantized weights (outputs, input and routing-weight gradients), and whether Triton ran."""
    import copy

    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from phyassist.models.mixtral4bit import kernels
    from phyassist.models.mixtral4bit.experts import Quant4bitExperts

    cfg = mixtral_config(dev.type != "cuda")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        ex = MixtralExperts(cfg).to(dtype)
        for p in ex.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        x = torch.randn(tokens, cfg.hidden_size, dtype=dtype)
        w, idx = torch.softmax(torch.randn(tokens, cfg.num_local_experts), -1).topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    q = Quant4bitExperts(ex, compute_dtype=dtype)
    ref = copy.deepcopy(ex)
    with torch.no_grad():
        ref.gate_up_proj.copy_(q.gate_up.dequantize())
        ref.down_proj.copy_(q.down.dequantize())
    res = {"triton": kernels.use_triton(x)}
    for keep in (True, False):
        q.keep_activations = keep
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ws = [w.clone().requires_grad_() for _ in range(2)]
        outs = [ref(xs[0], idx, ws[0]), q(xs[1], idx, ws[1])]
        g = torch.randn_like(outs[0])
        for o in outs:
            o.backward(g)
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        res[f"keep={keep}"] = dict(out=rel(outs[1], outs[0]), grad_x=rel(xs[1].grad, xs[0].grad),
                                   grad_w=rel(ws[1].grad, ws[0].grad))
    del ex, ref, q
    return res


def check_dequant(dev, shape=(8, 28672, 4096), reps: int = 10) -> dict:
    """The kit's NF4 kernel against bitsandbytes' on one layer's gate/up experts: equal values?
    time per call and memory bandwidth (4-bit bytes read + bf16 written) of each."""
    import bitsandbytes.functional as bnbf

    from phyassist.models.mixtral4bit import kernels

    if dev.type != "cuda":
        shape = (4, 128, 64)
    w = torch.randn(shape, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32) * 0.02
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    del w
    res = {}
    outs = {}
    for name, fn in (("bitsandbytes", lambda: bnbf.dequantize_4bit(packed, state)),
                     ("kit", lambda: kernels.dequantize_nf4(packed, state))):
        outs[name] = fn().view(-1)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        dt = (time.perf_counter() - t) / reps
        nbytes = packed.numel() + outs[name].numel() * outs[name].element_size()
        res[name] = dict(ms=round(dt * 1e3, 3), gb_per_s=round(nbytes / dt / 1e9, 1))
    if dev.type == "cuda":  # launch configurations of the kit's kernel
        sweep = {}
        for nbytes in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                launch = dict(block_bytes=nbytes, warps=warps)
                kernels.dequantize_nf4(packed, state, **launch)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(reps):
                    kernels.dequantize_nf4(packed, state, **launch)
                torch.cuda.synchronize()
                sweep[f"{nbytes}B/{warps}w"] = round((time.perf_counter() - t) / reps * 1e3, 3)
        res["sweep_ms"] = sweep
    diff = outs["kit"].float() - outs["bitsandbytes"].float()
    res["values_differing"] = int((diff != 0).sum())
    res["max_abs_diff"] = float(diff.abs().max())
    res["values"] = outs["kit"].numel()
    res["triton"] = kernels.use_triton(packed)
    return res


def matmul_ceiling(dev) -> float:
    """Measured dense bf16 GEMM rate (8192^3), TFLOP/s."""
    if dev.type != "cuda":
        return float("nan")
    a, b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16), torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def prepare(model, ckpt: str, lora_cfg, compile: bool = False, attn_keep: int = 0, memory_budget=None,
            compile_mode=None):
    """ckpt: full (whole layers), attention (attention halves; experts recompute gate/up),
    experts (only the experts recompute), none (nothing recomputed)."""
    from phyassist.models.mixtral4bit.checkpointing import checkpoint_attention_only, decoder_layers

    model.config.use_cache = False
    if ckpt == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = apply_lora(model, lora_cfg)
    if ckpt in ("attention", "experts") or compile:
        checkpoint_attention_only(peft_model, keep_expert_activations=ckpt == "none", compile=compile,
                                  checkpoint_attention=ckpt == "attention", memory_budget=memory_budget,
                                  compile_mode=compile_mode)
        for layer in decoder_layers(peft_model)[:attn_keep]:
            layer.attention_only.checkpoint = False
    return peft_model


def make_step(peft_model, part: str, fused_ce: bool, batch, dev, hidden_size):
    """A closure running forward + backward for the full model or one half."""
    lm = peft_model.base_model.model
    ids = batch
    labels = batch.clone()
    if part == "half1":
        h_in = torch.randn(*ids.shape, hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):  # as the trainer (bf16)
            return _step()

    def _step():
        if part == "half0":
            out = lm.model(input_ids=ids).last_hidden_state
            out.backward(torch.randn_like(out))
            return None
        kwargs = {"inputs_embeds": h_in} if part == "half1" else {"input_ids": ids}
        if fused_ce:
            hidden = lm.model(**kwargs).last_hidden_state
            loss = fused_linear_cross_entropy(hidden, lm.lm_head.weight, labels)
        else:
            loss = lm(**kwargs, labels=labels).loss
        loss.backward()
        return loss.detach()

    return step


def run_variant(name, spec, args, dev, part="full"):
    import torch._inductor.config

    from phyassist.models.mixtral4bit import checkpointing, experts

    host_counts = experts._host_counts
    if spec.get("stale_counts"):  # a diagnostic, not a training path: patched here, not an option
        layers = mixtral_config(args.tiny, args.layers).num_hidden_layers
        experts._host_counts = stale_host_counts(host_counts, layers)
    inductor = torch._inductor.config
    fallback_random = inductor.fallback_random
    if spec.get("fallback_random", False) != fallback_random:
        torch._dynamo.reset()  # compiled graphs cached under the other setting
        checkpointing._compiled.clear()
        inductor.fallback_random = spec.get("fallback_random", False)
    try:
        return _run_variant(name, spec, args, dev, part)
    finally:
        if inductor.fallback_random != fallback_random:
            torch._dynamo.reset()
            checkpointing._compiled.clear()
            inductor.fallback_random = fallback_random
        experts._host_counts = host_counts


def stale_host_counts(real, layers: int):
    """``+stalecounts``: the first ``layers`` calls (one forward) wait for the router's counts as
    the kit does; every later call returns the counts of the same layer in that first forward."""
    cache, calls = [], itertools.count()

    def host_counts(ends):
        i = next(calls)
        if i < layers:
            cache.append(real(ends)())
        counts = cache[i % layers]
        return lambda: counts

    return host_counts


def _run_variant(name, spec, args, dev, part="full"):
    cfg = mixtral_config(args.tiny, args.layers)
    quant = QuantConfig(load_in_4bit=True, double_quant=True, compute_dtype="bfloat16" if dev.type == "cuda" else "float32",
                        expert_gemm=spec.get("expert_gemm", "grouped"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rng_layers = None
    if part != "full":
        half = cfg.num_hidden_layers // 2
        cfg.num_hidden_layers = half
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if part != "full":
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), dev)
    t0 = time.perf_counter()
    dequantize = "triton" if spec.get("dequant", "kit") == "kit" else "bitsandbytes"
    model = build_quantized_model(cfg, quant, dev, method=spec["method"], layers=rng_layers,
                                  with_embed=part != "half1", with_head=part != "half0", dtype=dtype,
                                  progress=False,
                                  expert_options={"dequantize": dequantize} if spec["method"] == "grouped" else None)
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated(dev) / GIB if dev.type == "cuda" else float("nan")
    lora = LoraConfig(r=32, alpha=32, dropout=spec.get("lora_dropout", 0.05), target_router=True)
    peft_model = prepare(model, spec["ckpt"], lora, spec.get("compile", False), spec.get("attn_keep", 0),
                         spec.get("memory_budget"), spec.get("compile_mode"))
    if spec.get("keep_weights"):
        keep_dequantized_weights(peft_model, spec["keep_weights"])
    if spec.get("skew"):
        set_skew(peft_model, spec["skew"])
    if spec.get("lora_dtype"):
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.to(getattr(torch, spec["lora_dtype"]))
    peft_model.train()
    trainable = trainable_parameters(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = make_optimizer(params, args.lr, dev, spec.get("flat", False))
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(dev)
    step = make_step(peft_model, part, spec["fused_ce"], batch, dev, cfg.hidden_size)
    losses, times, first_s = [], [], None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        for _ in range(args.accum):  # micro-batches per optimizer step (gradient accumulation)
            loss = step()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        elif i == 0:
            first_s = time.perf_counter() - t  # includes torch.compile for the compiled variants
        if loss is not None:
            losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved(dev) / GIB if dev.type == "cuda" else float("nan")
    prof = profile_step(step, dev, args.profile_shapes, args.profile_rows) if args.profile and part == "full" and name in args.profile.split(",") else None
    idle = gpu_idle(step, opt, params, dev) if part == "full" and name in args.timeline.split(",") else None
    step_s = statistics.median(times)
    tokens = args.accum * args.batch * args.seq
    tps = tokens / step_s
    _, peak_flops = gpu_peak()
    mfu = tps * flops_per_token(cfg, args.seq) / peak_flops if part == "full" else float("nan")
    row = dict(variant=name, part=part, layers=cfg.num_hidden_layers, weights_gib=round(weights, 3),
               peak_gib=round(peak, 3), reserved_gib=round(reserved, 3), step_s=round(step_s, 4),
               tokens_per_s=round(tps, 1), mfu=round(mfu, 4), trainable=trainable, build_s=round(build_s, 1),
               first_step_s=round(first_s, 1) if first_s is not None else None,
               losses=[round(x, 4) for x in losses], times=[round(x, 4) for x in times], profile=prof,
               gpu_idle=idle)
    if spec.get("skew"):
        row["skew"], row["expert_share"] = spec["skew"], expert_shares(peft_model)
    del step, opt, params, peft_model, model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    return row


def make_optimizer(params, lr, dev, flat: bool = False):
    """PagedAdamW32bit (the study's) on GPUs, torch's AdamW on the CPU; ``flat``: the same class
    over one flat view of all the LoRA tensors (:mod:`phyassist.train.flat_optim`)."""
    from phyassist.train.flat_optim import flat_optimizer

    if dev.type == "cuda":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW32bit
    else:
        cls = torch.optim.AdamW
    return flat_optimizer(cls, [{"params": params}], lr=lr) if flat else cls(params, lr=lr)


def profile_step(step, dev, shapes: bool = False, rows: int = 25) -> str:
    """Top CUDA kernels of one step, grouped by name (where the time goes); ``shapes``: also the
    top ops grouped by input shapes (which matmuls are slow)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=shapes) as p:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    text = p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    if shapes:
        text += "\n\nBy input shapes:\n" + p.key_averages(group_by_input_shape=True).table(
            sort_by="self_" + key,
            row_limit=40, max_name_column_width=40, max_shapes_column_width=80)
    return text


def gpu_idle(step, opt, params, dev, min_gap_us: float = 5.0) -> dict | None:
    """Where the GPU waits in one training step: its busy and idle time, and the idle gaps
    grouped by the top-level CPU op that launched the kernel ending each gap (the op the GPU
    waited for)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import warnings

    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # every host-device sync in one step, by source line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("default")
    syncs: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            syncs[key] = syncs.get(key, 0) + 1
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        with record_function("phase: forward+backward"):
            step()
        with record_function("phase: clip+optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return {**idle_breakdown(p, min_gap_us), "syncs": syncs}


def idle_breakdown(prof, min_gap_us: float = 5.0) -> dict:
    """GPU busy and idle time of a finished ``torch.profiler.profile`` (kernels of all streams as
    one union), the idle gaps grouped by the innermost named CPU region (autograd node, compiled
    region, optimizer step, phase) that launched the kernel ending each gap: what the GPU waited for."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in events
              if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    regions = ("autograd::engine::evaluate_function", "Torch-Compiled Region", "Optimizer.", "_MoEExperts",
               "CompiledFunction", "phase:")
    cpu_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e
               and e["name"].startswith(regions)]

    def owner(ts, tid):
        """The innermost named region enclosing a launch (autograd node, compiled region, phase)."""
        inside = [e for e in cpu_ops if e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"]]
        return min(inside, key=lambda e: e["dur"])["name"] if inside else "?"

    busy, gaps, last_end = 0.0, {}, None
    for e in gpu:
        start, end = e["ts"], e["ts"] + e["dur"]
        if last_end is not None and start - last_end > min_gap_us:
            corr = e.get("args", {}).get("correlation")
            src = launch.get(corr)
            key = owner(src["ts"], src["tid"]) if src else "?"
            gaps[key] = gaps.get(key, 0.0) + (start - last_end)
        busy += max(0.0, end - max(start, last_end or start))
        last_end = end if last_end is None else max(last_end, end)
    span = (last_end - gpu[0]["ts"]) if gpu else 0.0
    top = sorted(gaps.items(), key=lambda kv: -kv[1])[:12]
    return dict(span_ms=round(span / 1e3, 1), busy_ms=round(busy / 1e3, 1), idle_ms=round((span - busy) / 1e3, 1),
                idle_by_owner_ms={k[:90]: round(v / 1e3, 2) for k, v in top})


def table(rows) -> str:
    w = max([15] + [len(r["variant"]) + 2 for r in rows])
    head = f"{'variant':<{w}}{'part':<7}{'layers':>6}{'weights GiB':>12}{'peak GiB':>10}{'step s':>9}{'tok/s':>9}{'MFU':>7}{'vs plain':>9}"
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "plain" and r["part"] == "full"), None)
    lines = [head, "-" * len(head)]
    for r in rows:
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base and r["part"] == "full" else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "-"
        lines.append(f"{r['variant']:<{w}}{r['part']:<7}{r['layers']:>6}{r['weights_gib']:>12.2f}{r['peak_gib']:>10.2f}"
                     f"{r['step_s']:>9.3f}{r['tokens_per_s']:>9.0f}{mfu:>7}{rel:>9}")
    return "\n".join(lines)


# --- tables rebuilt from the raw JSON (--from-json): no GPU, no model --------------------------

def _fmt(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


def recompute(path) -> dict:
    """One raw JSON of this script with every figure derived again from the per-step times it keeps
    (``times``): true median (``statistics.median``) of each pass, tokens/s and MFU from it
    (MFU as in this script: flops_per_token of the architecture at the run's sequence length,
    the JSON's ``peak_tflops``), and "vs plain" against the first plain pass of the file, as
    ``table`` prints it. ``step_s`` of the JSON is kept as ``recorded_s``: the runs of 2026-11-24
    recorded the upper median (``sorted(t)[n // 2]``) of their even number of steps."""
    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    tokens = meta["batch"] * meta["seq"] * meta.get("accum", 1)
    peak = meta["peak_tflops"] * 1e12
    rows = []
    for r in data["rows"]:
        if "error" in r:
            continue
        t = r["times"]
        med = statistics.median(t)
        fpt = flops_per_token(mixtral_config(False, r["layers"]), meta["seq"])
        rows.append(dict(variant=r["variant"], part=r["part"], peak_gib=r["peak_gib"], steps=len(t), times=t,
                         median_s=med, recorded_s=r["step_s"], tokens_per_s=tokens / med,
                         mfu=tokens / med * fpt / peak if r["part"] == "full" else None))
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "plain" and r["part"] == "full"), None)
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / base if base and r["part"] == "full" else None
    return dict(path=str(path), date=meta["date"], device=meta["device"], argv=meta["argv"], tokens=tokens,
                peak=peak, seq=meta["seq"], rows=rows)


def pooled(runs: list[dict]) -> list[dict]:
    """Per (variant, part) over all passes of ``runs``: the true median of all their steps, and the
    range of the passes' medians."""
    groups: dict = {}
    for run in runs:
        for r in run["rows"]:
            g = groups.setdefault((r["variant"], r["part"]), dict(variant=r["variant"], part=r["part"], times=[],
                                                                  passes=[], peak_gib=r["peak_gib"], run=run))
            g["times"] += r["times"]
            g["passes"].append(r)
    out = []
    for g in groups.values():
        med = statistics.median(g["times"])
        run = g["run"]
        mfu = None
        if g["part"] == "full":
            fpt = flops_per_token(mixtral_config(False), run["seq"])
            mfu = run["tokens"] / med * fpt / run["peak"]
        out.append(dict(variant=g["variant"], part=g["part"], peak_gib=g["peak_gib"], steps=len(g["times"]),
                        median_s=med, mfu=mfu, passes=g["passes"]))
    return out


def report(paths) -> str:
    """Markdown tables of the raw JSONs ``paths`` (one per file, then pooled per variant)."""
    runs = [recompute(p) for p in paths]
    lines = []
    for run in runs:
        lines += [f"{run['path']}: {run['date']}, {run['device']}, {run['tokens']:,} tokens a step",
                  f"argv: {' '.join(run['argv'])}", "",
                  "| variant | part | peak GiB | steps | median s | recorded s | tokens/s | MFU | vs plain |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in run["rows"]:
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
            rel = f"{r['vs_plain']:.2f}x" if r["vs_plain"] is not None else "-"
            lines.append(f"| {r['variant']} | {r['part']} | {r['peak_gib']:.2f} | {r['steps']} | {r['median_s']:.4f} | "
                         f"{r['recorded_s']:.4f} | {_fmt(r['tokens_per_s'], 0)} | {mfu} | {rel} |")
        lines.append("")
    lines += ["pooled over the files above (true median of all steps; the passes' medians and MFU):", "",
              "| variant | part | peak GiB | steps | pooled median s | MFU | vs plain | passes (median s) | passes (MFU) |",
              "|---|---|---:|---:|---:|---:|---:|---|---|"]
    groups = pooled(runs)
    base = next((g["median_s"] for g in groups if g["variant"] == "plain" and g["part"] == "full"), None)
    for g in groups:
        mfu = f"{100 * g['mfu']:.1f} %" if g["mfu"] is not None else "-"
        rel = f"{base / g['median_s']:.2f}x" if base and g["part"] == "full" else "-"
        meds = ", ".join(f"{p['median_s']:.4f}" for p in g["passes"])
        mfus = ", ".join(f"{100 * p['mfu']:.1f}" for p in g["passes"] if p["mfu"] is not None) or "-"
        lines.append(f"| {g['variant']} | {g['part']} | {g['peak_gib']:.2f} | {g['steps']} | {g['median_s']:.4f} | "
                     f"{mfu} | {rel} | {meds} | {mfus} |")
    return "\n".join(lines)


def smi_summary(path, busy_w: float = 300.0) -> dict:
    """An ``nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active
    --format=csv -lms 250`` log: the samples drawing more than ``busy_w`` (the GPU at work), their
    median power and SM clock, the clock's range, and how many name the software power cap (0x4)."""
    import csv

    rows = list(csv.reader(Path(path).read_text().splitlines()))[1:]
    samples = [(float(r[1].split()[0]), float(r[2].split()[0]), int(r[3].strip(), 16)) for r in rows if len(r) >= 4]
    busy = [s for s in samples if s[1] > busy_w]
    return dict(samples=len(samples), busy=len(busy), median_w=statistics.median(s[1] for s in busy),
                median_sm_mhz=statistics.median(s[0] for s in busy), sm_mhz_range=(min(s[0] for s in busy),
                                                                                 max(s[0] for s in busy)),
                power_cap=sum(1 for s in busy if s[2] & 0x4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-json", nargs="+", metavar="JSON", default=None,
                    help="print the tables of these raw JSONs, recomputed from their per-step times (no GPU)")
    ap.add_argument("--smi", nargs="+", metavar="CSV", default=None,
                    help="summarize nvidia-smi logs (samples above 300 W: median power, SM clock, power cap)")
    ap.add_argument("--tiny", action="store_true", help="tiny Mixtral on the CPU (script check)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--variants", default="plain,fused,fused-attn,fused-attn-stockce,fused-nockpt")
    ap.add_argument("--halves", default="fused-attn", help="variant for the 2 x 24 GB simulation ('' to skip)")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches per optimizer step (the study: 4); step s and tokens/s count them all")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--profile", default="plain,fused-attn,fused-nockpt", help="variants to profile one step of")
    ap.add_argument("--profile-rows", type=int, default=25, help="rows of the profile table")
    ap.add_argument("--profile-shapes", action="store_true", help="profiles also list ops by input shape")
    ap.add_argument("--timeline", default="", help="variants whose GPU idle time is broken down (one step)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.from_json or args.smi:
        if args.from_json:
            print(report(args.from_json))
        for path in args.smi or []:
            print(f"{path}: {json.dumps(smi_summary(path))}")
        return 0
    dev = torch.device("cuda", 0) if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    gpu, peak = gpu_peak()
    ceiling = matmul_ceiling(dev)
    check = check_experts(dev, tokens=64 if args.tiny else 4096)
    print("fused experts vs transformers' experts (relative L2 error):", json.dumps(check), flush=True)
    dq = check_dequant(dev)
    print("NF4 dequantization, one layer's gate/up experts:", json.dumps(dq), flush=True)
    meta = dict(device=gpu, peak_tflops=peak / 1e12, measured_gemm_tflops=round(ceiling, 1), torch=torch.__version__, experts_check=check, dequant_check=dq,
                batch=args.batch, seq=args.seq, accum=args.accum, steps=args.steps, warmup=args.warmup,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), argv=sys.argv[1:])
    print(json.dumps(meta), flush=True)
    rows = []
    jobs = [(v, "full") for v in args.variants.split(",") if v]
    jobs += [(args.halves, p) for p in ("half0", "half1") if args.halves]
    for name, part in jobs:
        try:
            row = run_variant(name, variant_spec(name), args, dev, part)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            row = dict(variant=name, part=part, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_mixtral.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    for r in rows:
        if r.get("profile"):
            (Path(args.out) / f"profile_{r['variant'].replace('+', '_')}.txt").write_text(r["profile"])
    ok = [r for r in rows if "error" not in r]
    print(table(ok))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']} {r['part']}: {r['error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
