"""Dry run: build the configured model on the meta device (no weights, no GPU), count the
LoRA's trainable parameters and project GPU memory per GPU, so a student can repeat the study's
model selection (which candidates fit 2 x 24 GB?) in seconds.

The projection is arithmetic on the architecture, term by term (bench/finetune_mixtral.md
compares it with measured peaks):

* 4-bit weights: every matrix the run quantizes (attention/MLP linears, fused MoE experts) at
  0.5 byte per value plus block statistics: one fp32 absmax per 64 values, or with double
  quantization one byte per 64 values plus one fp32 per 16,384 values.
* 16-bit weights: embeddings, LM head, norms and routers in the compute dtype.
* LoRA + optimizer: fp32 adapter weights, gradients and two 32-bit Adam moments (16 bytes each).
* activations at the micro-batch: with gradient checkpointing, one bf16 hidden state per layer
  boundary plus one layer's full working set (for MoE: the dequantized experts of a layer too),
  plus the logits (bf16 + fp32 loss copies + gradient); without, every layer's activations and
  one layer's dequantized experts; plus the dequantized experts of the layers that keep them for
  the backward (``model.quant.keep_dequantized_layers``, the last layers, so on the last GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phyassist.models.placement import GIB, balance_layers, parse_gib
from phyassist.models.quant import four_bit_bytes, stored_in_4bit
from phyassist.train.lora import router_parameter_names

CUDA_OVERHEAD_GIB = 0.6  # CUDA context + cuBLAS workspace + allocator slack, per GPU


@dataclass
class Projection:
    model: str
    total_params: int
    trainable: int
    layers: int
    quant_params: int  # values stored in 4 bit
    dense_params: int  # values kept in 16 bit
    layer_weight_gib: float  # one decoder layer in 4 bit (double quant as configured)
    weights_4bit_gib: float  # whole model, without double quant
    weights_4bit_dq_gib: float  # whole model, with double quant
    double_quant: bool
    lora_opt_gib: float
    boundary_gib_per_layer: float
    layer_work_gib: float
    logits_gib: float
    embed_gib: float
    head_gib: float
    micro_batch: int
    seq_len: int
    cap_gib: float | None
    num_gpus: int
    per_gpu: list[float] = field(default_factory=list)
    layers_per_gpu: list[int] = field(default_factory=list)
    checkpointing: bool | str = True  # effective mode (``attention`` falls back to whole layers on dense models)
    kept_weights_gib: float = 0.0  # dequantized experts saved for the backward (keep_dequantized_layers)
    on_gpu: bool = True  # False: a CPU profile (model.device_map: cpu), one device, no CUDA context
    quantized: bool = True  # model.quant.load_in_4bit
    dense_bits: int = 16  # the weights kept out of 4 bit: 16-bit, or 32 with a float32 profile
    router_adapted: bool = False  # the LoRA adapts an MoE router (train.lora.target_router on an MoE model)

    @property
    def overhead_gib(self) -> float:
        """Per device: the CUDA context, cuBLAS workspace and allocator slack of a GPU; nothing on a CPU."""
        return CUDA_OVERHEAD_GIB if self.on_gpu else 0.0

    @property
    def weights_gib(self) -> float:
        return self.weights_4bit_dq_gib if self.double_quant else self.weights_4bit_gib

    def split(self, n: int) -> tuple[list[int], list[float]]:
        """Layers over ``n`` GPUs as the loader places them (equal blocks, embeddings on the first,
        head, logits and kept experts on the last) and each GPU's total."""
        per_layer = self.layer_weight_gib + self.boundary_gib_per_layer
        fixed = [self.overhead_gib + self.layer_work_gib + self.lora_opt_gib / n for _ in range(n)]
        fixed[0] += self.embed_gib
        fixed[-1] += self.head_gib + self.logits_gib + self.kept_weights_gib
        counts = balance_layers(self.layers, fixed)
        return counts, [f + c * per_layer for f, c in zip(fixed, counts)]

    def per_gpu_gib(self, n: int) -> float:
        return max(self.split(n)[1])

    def gpus_needed(self, cap_gib: float, limit: int = 64) -> int | None:
        return next((n for n in range(1, limit + 1) if self.per_gpu_gib(n) <= cap_gib), None)

    def fits(self) -> bool | None:
        return None if self.cap_gib is None else max(self.per_gpu) <= self.cap_gib

    def summary_line(self) -> str:
        return (f"weights {self.weights_gib:.1f} GiB + LoRA/optimizer {self.lora_opt_gib:.2f} GiB + "
                f"activations at {self.micro_batch}x{self.seq_len}")


def meta_model(name: str):
    """The architecture on the meta device: shapes without memory or weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from phyassist.models.registry import architecture_config

    config = architecture_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config


def count_trainable(model, lcfg) -> int:
    from phyassist.train.lora import apply_lora, trainable_parameters

    for p in model.parameters():
        p.requires_grad_(False)
    return trainable_parameters(apply_lora(model, lcfg))


def project(cfg, micro_batch: int | None = None, num_gpus: int | None = None) -> Projection:
    """The memory projection for ``cfg`` (see module docstring for each term)."""
    m, t = cfg.model, cfg.train
    model, config = meta_model(m.name)
    bsz = micro_batch or t.per_device_train_batch_size
    seq = m.max_seq_length
    tokens = bsz * seq
    q_params = dense = 0
    layer_q = layer_dense = 0
    q4 = m.quant.load_in_4bit
    dense_bytes = 2 if m.dtype != "float32" and m.quant.compute_dtype != "float32" else 4
    for name, p in model.named_parameters():
        quant = q4 and stored_in_4bit(name, p, m.quant.quantize_experts)
        if quant:
            q_params += p.numel()
        else:
            dense += p.numel()
        if ".layers.0." in name:
            layer_q, layer_dense = (layer_q + p.numel(), layer_dense) if quant else (layer_q, layer_dense + p.numel())
    total = q_params + dense
    routers = router_parameter_names(model, t.lora.router_parameters) if t.lora.target_router else []
    trainable = count_trainable(model, t.lora)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    vocab = config.vocab_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    experts = getattr(config, "num_local_experts", 0) or 0
    top_k = getattr(config, "num_experts_per_tok", 1) if experts else 1
    kv = hidden // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    act = 2  # bf16 activations
    attn_work = tokens * (6 * hidden + 4 * kv) * act
    mlp_work = tokens * top_k * (2 * hidden + 3 * inter) * act
    dequant_work = (experts * 3 * hidden * inter * act) if (experts and q4) else 0
    layer_work = attn_work + mlp_work + dequant_work
    kit_experts = experts and q4 and m.quant.quantize_experts and m.quant.experts_method == "grouped"
    # the kit's 4-bit experts save only their input and the gate/up activations (SwiGLU's output
    # is recomputed from them, the down projection's output is not needed)
    mlp_saved = tokens * (hidden + top_k * 2 * inter) * act if kit_experts else mlp_work
    ckpt = t.gradient_checkpointing
    if ckpt == "attention" and not kit_experts:
        ckpt = True  # as the trainer does (phyassist.models.mixtral4bit.checkpointing.resolve_mode)
    # whole-layer checkpointing keeps each layer's input; attention-only also the MoE input; none
    # all of a layer's activations, with one layer's dequantized experts as the working set
    boundary = tokens * hidden * act * (2 if ckpt == "attention" else 1) if ckpt else attn_work + mlp_saved
    bytes_w = lambda n, dq: four_bit_bytes(n, dq) if q4 else n * dense_bytes  # noqa: E731
    embed = config.vocab_size * hidden * dense_bytes
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    proj = Projection(
        model=m.name, total_params=total, trainable=trainable, layers=layers, quant_params=q_params,
        dense_params=dense,
        layer_weight_gib=(bytes_w(layer_q, m.quant.double_quant) + layer_dense * dense_bytes) / GIB,
        weights_4bit_gib=(bytes_w(q_params, False) + dense * dense_bytes) / GIB,
        weights_4bit_dq_gib=(bytes_w(q_params, True) + dense * dense_bytes) / GIB,
        double_quant=m.quant.double_quant, lora_opt_gib=trainable * 16 / GIB,
        boundary_gib_per_layer=boundary / GIB, layer_work_gib=(layer_work if ckpt else dequant_work) / GIB,
        logits_gib=tokens * vocab * (2 + 4 + 4) / GIB, embed_gib=embed / GIB, head_gib=head / GIB,
        micro_batch=bsz, seq_len=seq, cap_gib=parse_gib(m.max_memory_per_gpu),
        num_gpus=num_gpus or m.num_gpus or 1, checkpointing=ckpt,
        # under whole-layer checkpointing they live only during one layer's recompute (working set)
        kept_weights_gib=0.0 if ckpt is True else m.quant.keep_dequantized_layers * dequant_work / GIB,
        on_gpu=m.device_map != "cpu", quantized=q4, dense_bits=8 * dense_bytes, router_adapted=bool(routers))
    if not proj.on_gpu:
        proj.num_gpus = 1  # a CPU profile runs on one device whatever model.num_gpus says
    proj.layers_per_gpu, proj.per_gpu = proj.split(proj.num_gpus)
    return proj


def largest_micro_batch(cfg, cap_gib: float, num_gpus: int, limit: int = 64) -> int:
    """The largest micro-batch whose projection fits ``cap_gib`` on ``num_gpus`` (0: none)."""
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64):
        if b > limit or project(cfg, micro_batch=b, num_gpus=num_gpus).per_gpu_gib(num_gpus) > cap_gib:
            break
        best = b
    return best


def _row(label: str, gib: float, note: str = "") -> str:
    return f"  {label:<38}{gib:8.2f}" + (f"   {note}" if note else "")


def _device_label(proj: Projection, i: int) -> str:
    """``GPU i: n layers`` with what else that GPU holds (``CPU: all n layers`` on a CPU profile)."""
    device = f"GPU {i}" if proj.on_gpu else "CPU"
    if len(proj.layers_per_gpu) == 1:
        return f"{device}: all {proj.layers} layers"
    parts = [f"{proj.layers_per_gpu[i]} layers"]
    if i == 0:
        parts.append("embeddings")
    if i == len(proj.layers_per_gpu) - 1:
        parts.append("head, logits" + (", kept experts" if proj.kept_weights_gib else ""))
    return f"{device}: {' + '.join(parts)}"


def report(cfg, proj: Projection) -> str:
    """The dry run's printout: counts, the projection (whole-model terms, then what each device
    holds) and a clear verdict."""
    n = proj.num_gpus
    lora = cfg.train.lora
    where = f"{n} GPU(s)" if proj.on_gpu else "the CPU"
    last = "on the last GPU" if proj.on_gpu and n > 1 else ""
    lines = [
        f"model            {proj.model}  ({proj.total_params / 1e9:.2f} B parameters, {proj.layers} layers)",
        f"trainable (LoRA) {proj.trainable:,}  (r={lora.r}, alpha={lora.alpha}, "
        f"targets {', '.join(lora.target_modules)}{' + MoE router' if proj.router_adapted else ''})",
        f"micro-batch      {proj.micro_batch} x {proj.seq_len} tokens, gradient checkpointing "
        f"{ {True: 'on', False: 'off', 'attention': 'attention only'}[proj.checkpointing]}",
        f"runs on          {where}",
        "memory projection, whole model (GiB)",
    ]
    if proj.quantized:
        lines += [_row("weights, 4-bit without double quant", proj.weights_4bit_gib,
                       "" if proj.double_quant else "<- configured"),
                  _row("weights, 4-bit with double quant", proj.weights_4bit_dq_gib,
                       "<- configured" if proj.double_quant else "")]
    else:
        lines.append(_row(f"weights, {proj.dense_bits}-bit", proj.weights_gib))
    lines += [
        _row("LoRA + gradients + Adam (fp32)", proj.lora_opt_gib, f"split over the {n} GPUs" if n > 1 else ""),
        _row("activations: layer boundaries", proj.boundary_gib_per_layer * proj.layers, "with each device's layers"),
        _row("activations: logits + loss", proj.logits_gib, last),
        *([_row(f"kept dequantized experts ({cfg.model.quant.keep_dequantized_layers} layers)",
                proj.kept_weights_gib, last)] if proj.kept_weights_gib else []),
        f"memory projection, per {'GPU' if proj.on_gpu else 'device'} (GiB)",
        _row("activations: one layer's working set", proj.layer_work_gib),
        *([_row("CUDA context + workspace", proj.overhead_gib)] if proj.on_gpu else []),
    ]
    lines += [_row(_device_label(proj, i), g, "total") for i, g in enumerate(proj.per_gpu)]
    peak = max(proj.per_gpu)
    cap = proj.cap_gib
    if cap is None or not proj.on_gpu:
        lines.append(f"verdict: needs about {peak:.1f} GiB " + (f"per GPU on {n} GPU(s) (no cap configured)"
                                                               if proj.on_gpu else "of memory on the CPU"))
        return "\n".join(lines)
    if proj.fits():
        lines.append(f"verdict: FITS - {peak:.1f} GiB peak per GPU under the {cap:.1f} GiB cap on {n} GPU(s)")
    else:
        need = proj.gpus_needed(cap)
        mb = largest_micro_batch(cfg, cap, n)
        alt = [f"{need} GPUs of {cap:.0f} GiB" if need else f"no count of {cap:.0f} GiB GPUs"]
        if mb:
            alt.append(f"micro-batch {mb} (with more gradient accumulation)")
        lines.append(f"verdict: DOES NOT FIT - {peak:.1f} GiB per GPU needed, cap {cap:.1f} GiB "
                     f"on {n} GPU(s). Would fit: {' or '.join(alt)}.")
    return "\n".join(lines)


def dry_run(cfg) -> tuple[Projection, str]:
    proj = project(cfg)
    return proj, report(cfg, proj)
