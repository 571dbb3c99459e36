"""The accelerate configs on a GPU: ``configs/accelerate/{ddp,fsdp_qlora}.yaml`` launched on the kit's
trainer, with a random dense model of Mistral-7B's width (only the layer count is smaller), 4-bit NF4.

What it proves: the launch starts, the kit loads the model as each config needs (FSDP: no device map,
4-bit bytes stored as bf16 so FSDP2 can shard them), the trainer wraps it (``<run>/parallel.json``:
how many parameters are sharded, 4-bit ones included), trains with a finite loss, and one process
writes the adapter. With as many processes as GPUs are present (one on a one-GPU machine: FSDP's
sharding over several GPUs is then not exercised; the CPU test tests/test_distributed.py shards the
4-bit weights over two processes).

    python bench/distributed_gpu.py --out /root/out/distributed --layers 8 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, layers: int, tokenizer: str) -> dict:
    """Random Mistral-7B-width dense model saved as safetensors with Mixtral's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                        rope_theta=1e6, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    del model
    return {"layers": layers, "parameters": n}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def launch(kind: str, model_dir: Path, run: Path, data: Path, steps: int, nproc: int, extra: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(data, run / "data")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{kind}.yaml"), "--num_processes", str(nproc),
           "-m", "phyassist", "train", "--config", "smoke", "--output-dir", str(run),
           f"model.name={model_dir}", "model.chat_template=mixtral", "model.device_map=single",
           "model.dtype=bfloat16", "model.quant.compute_dtype=bfloat16", "model.max_seq_length=512",
           "train.bf16=true", f"train.max_steps={steps}", f"train.save_steps={steps}", "train.logging_steps=1",
           "train.per_device_train_batch_size=4", "train.gradient_checkpointing=true", "train.optim=paged_adamw_32bit",
           "train.lora.r=32", "train.lora.alpha=32", "wandb.mode=disabled", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    res = {"command": " ".join(cmd[2:]), "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    (run.parent / f"{kind}.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        res["error_tail"] = proc.stderr[-2500:]
        return res
    res["layout"] = json.loads((run / "parallel.json").read_text())
    state = json.loads((run / "checkpoints" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    res["losses"] = [h["loss"] for h in logs]
    res["peak_gib"] = max((h.get("gpu0_peak_gib", 0) for h in logs), default=None)
    res["tokens_per_s"] = [h.get("tokens_per_s") for h in logs][-3:]
    res["adapter_files"] = sorted(p.name for p in (run / "adapter").iterdir())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokenizer", default=str(ROOT / ".whl_app" / "mistral-v1-tokenizer"))
    ap.add_argument("--kinds", default="fsdp_qlora,ddp")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("WORK", "/tmp/dist_bench"))
    model_dir = work / "model"
    t0 = time.time()
    res = {"machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["model"] = build_model(model_dir, args.layers, args.tokenizer)
    res["model"]["build_s"] = round(time.time() - t0, 1)
    data_run = work / "data_run"
    subprocess.run([sys.executable, "-m", "phyassist", "data", "--config", "smoke", "--output-dir", str(data_run),
                    f"model.name={model_dir}", "model.chat_template=mixtral"], check=True, cwd=ROOT,
                   env=_env())
    nproc = max(torch.cuda.device_count(), 1)
    for kind in args.kinds.split(","):
        res[kind] = launch(kind, model_dir, work / kind, data_run / "data", args.steps, nproc, [])
        print(kind, json.dumps(res[kind], indent=1)[:3000], flush=True)
    (out / "distributed_gpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
