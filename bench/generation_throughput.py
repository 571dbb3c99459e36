"""Generation throughput: the kit's batched path vs a per-example ``generate`` loop.

The per-example loop is what the study's test notebook does (tokenize one prompt, generate,
decode, next). Both paths run in the same process on the same model and the same chat-formatted
prompts, and generate exactly ``--max-new-tokens`` tokens per prompt (``min_new_tokens`` pins
the count, so random weights that emit EOS early cannot flatter either side). The model has
the real architecture (``registry.architecture_config``) with random weights: speed does not
depend on the values.

    python bench/generation_throughput.py --device cuda --n-prompts 64 --batch-size 32 \
        --max-new-tokens 128 --dtype bfloat16 --out bench/generation_throughput
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_queries(args) -> list[str]:
    """Real IMHI queries (a test folder or a JSONL of {"query": ...}) repeated to n, else synthetic."""
    qs: list[str] = []
    if args.prompts_file:
        qs = [json.loads(line)["query"] for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    elif args.test_dir:
        import pandas as pd

        for f in sorted(Path(args.test_dir).glob("*.csv")):
            qs += pd.read_csv(f)["query"].astype(str).tolist()[: args.n_prompts]
    if not qs:
        qs = [f"Consider this post: \"I have felt tired and alone for {i} weeks and cannot sleep.\" "
              "Question: Does the poster suffer from depression?" for i in range(args.n_prompts)]
    qs = [q[: args.max_query_chars] for q in qs]
    return (qs * (args.n_prompts // len(qs) + 1))[: args.n_prompts]


def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phyassist.models.chat_templates import ensure_chat_template
    from phyassist.models.registry import architecture_config, resolve_model_path

    torch.manual_seed(0)
    config = architecture_config(args.arch)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or resolve_model_path(args.arch))
    ensure_chat_template(tok, "auto", "chatml")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def per_example_loop(model, tok, prompts, max_new_tokens, device) -> tuple[float, list[str]]:
    """The study's notebook: one prompt at a time."""
    import torch

    out = []
    sync(device)
    t0 = time.perf_counter()
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
    sync(device)
    return time.perf_counter() - t0, out


def batched(model, tok, prompts, max_new_tokens, batch_size, device) -> tuple[float, list[str]]:
    from phyassist.evaluate.generate import generate_batched

    sync(device)
    t0 = time.perf_counter()
    out = generate_batched(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=False, min_new_tokens=max_new_tokens)
    sync(device)
    return time.perf_counter() - t0, out


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="smollm2-135m-instruct")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the registry's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-query-chars", type=int, default=1200)
    ap.add_argument("--test-dir", default=None, help="IMHI test_instruction folder for real queries")
    ap.add_argument("--prompts-file", default=None, help="JSONL with a 'query' per line")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--command", default=None, help="command line recorded in the results")
    args = ap.parse_args(argv)

    from phyassist.evaluate.generate import chat_prompts

    model, tok = build_model(args)
    prompts = chat_prompts(tok, load_queries(args))
    n_tok = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    batched(model, tok, prompts[:2], 4, 2, args.device)  # warm-up (kernels, allocator)
    t_loop, out_loop = per_example_loop(model, tok, prompts, args.max_new_tokens, args.device)
    t_batch, out_batch = batched(model, tok, prompts, args.max_new_tokens, args.batch_size, args.device)
    gen_tokens = len(prompts) * args.max_new_tokens
    res = {
        "machine": machine(args.device), "device": args.device, "dtype": args.dtype, "arch": args.arch,
        "weights": "random init (speed does not depend on values)",
        "n_prompts": len(prompts), "prompt_tokens_mean": round(sum(n_tok) / len(n_tok), 1),
        "prompt_tokens_max": max(n_tok), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "per_example_s": round(t_loop, 3), "batched_s": round(t_batch, 3),
        "per_example_tok_per_s": round(gen_tokens / t_loop, 1), "batched_tok_per_s": round(gen_tokens / t_batch, 1),
        "speedup": round(t_loop / t_batch, 2),
        "identical_outputs": sum(a == b for a, b in zip(out_loop, out_batch)),
        "command": args.command or " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
