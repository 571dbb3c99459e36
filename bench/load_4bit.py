"""Peak GPU memory of loading a Mixtral checkpoint into 4 bit: the layer-by-layer loader
(phyassist.models.mixtral4bit.loader) against bitsandbytes' load followed by quantize_moe_experts.

The checkpoint is synthetic (random bf16) but has Mixtral-8x7B's layer shapes and the original
per-expert key layout, sharded one layer a file with an index json; only the number of decoder
layers is smaller, so that it fits the bench machine's disk and time.

    python bench/load_4bit.py all --layers 4 --workdir /tmp/ckpt --out bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
MIXTRAL = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)


def layer_tensors(config, i: int, device) -> dict:
    """One decoder layer's tensors under the original Mixtral names, random bf16."""
    import torch

    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    p = f"model.layers.{i}."
    shapes = {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
              p + "block_sparse_moe.gate.weight": (config.num_local_experts, h),
              p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    for e in range(config.num_local_experts):
        for w, shape in (("w1", (inter, h)), ("w2", (h, inter)), ("w3", (inter, h))):
            shapes[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = shape
    return {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, device=device) * 0.02)
            .to(torch.bfloat16).cpu() for k, s in shapes.items()}


def make_checkpoint(folder: Path, layers: int, **dims) -> None:
    """``dims`` override Mixtral-8x7B's sizes (a small checkpoint for a CPU check of a script)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    arch = dict(MIXTRAL, num_hidden_layers=layers, **dims)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    v, h = config.vocab_size, config.hidden_size
    shards = [{"model.embed_tokens.weight": (torch.randn(v, h, device=dev) * 0.02).bfloat16().cpu(),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": (torch.randn(v, h, device=dev) * 0.02).bfloat16().cpu()}]
    weight_map = {}
    for i in range(-1, layers):
        tensors = shards[0] if i < 0 else layer_tensors(config, i, dev)
        name = f"model-{i + 2:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure(folder: Path, path: str, logits_out: Path) -> dict:
    import torch

    from phyassist.models.schema import ModelConfig, QuantConfig

    mcfg = ModelConfig(name=str(folder), device_map="single", local_files_only=True,
                       quant=QuantConfig(load_in_4bit=True, compute_dtype="bfloat16"))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if path == "layerwise":
        from phyassist.models.loading import load_model

        model = load_model(mcfg)
    else:  # the previous route: bitsandbytes' 4-bit load, then the fused experts
        from transformers import AutoModelForCausalLM

        from phyassist.models.loading import bnb_config
        from phyassist.models.mixtral4bit.experts import quantize_moe_experts

        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(mcfg),
                                                     dtype=torch.bfloat16, device_map={"": 0})
        quantize_moe_experts(model, mcfg.quant)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    from phyassist.models.mixtral4bit.experts import sixteen_bit_weights

    row = dict(path=path, load_s=round(seconds, 2),
               peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
               after_load_gib=round(torch.cuda.memory_allocated() / GIB, 3),
               host_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
               sixteen_bit_weights=len(sixteen_bit_weights(model)))
    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits.float().cpu(), logits_out)
    return row


def run_all(args) -> int:
    import torch

    folder = Path(args.workdir)
    if not (folder / "model.safetensors.index.json").exists():
        make_checkpoint(folder, args.layers)
    rows = []
    for path in ("layerwise", "bnb_then_experts"):
        cmd = [sys.executable, __file__, "measure", str(folder), path]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.stderr.write(res.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    a, b = (torch.load(folder / f"logits_{p}.pt") for p in ("layerwise", "bnb_then_experts"))
    layer_bf16 = layer_params() * 2 / GIB
    result = dict(machine=torch.cuda.get_device_name(0), torch=torch.__version__, layers=args.layers,
                  one_layer_bf16_gib=round(layer_bf16, 3), rows=rows,
                  logits_max_abs_diff=float((a - b).abs().max()),
                  command=f"python bench/load_4bit.py all --layers {args.layers} --workdir {args.workdir}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_4bit.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def layer_params(h: int = 4096, inter: int = 14336, kv: int = 1024, experts: int = 8) -> int:
    """Parameters of one Mixtral-8x7B decoder layer (the 16-bit transient of the loader)."""
    return 2 * h * h + 2 * kv * h + experts * h + 2 * h + experts * 3 * inter * h


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--layers", type=int, default=4)
    a.add_argument("--workdir", default="/tmp/mixtral_synthetic")
    a.add_argument("--out", default="bench")
    m = sub.add_parser("measure")
    m.add_argument("folder")
    m.add_argument("path", choices=["layerwise", "bnb_then_experts"])
    args = ap.parse_args()
    if args.cmd == "all":
        return run_all(args)
    row = measure(Path(args.folder), args.path, Path(args.folder) / f"logits_{args.path}.pt")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
