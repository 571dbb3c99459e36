"""Multi-process training on CPU: configs/accelerate/ddp.yaml through ``accelerate launch`` (gloo), and
FSDP2 sharding of the kit's 4-bit weights. accelerate applies FSDP only on GPUs, so the FSDP test shards
the model itself exactly as accelerate's FSDP2 path does (``fully_shard`` per decoder layer, then the root)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phyassist.config import load_config
from phyassist.io import atomic_write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_ddp_config_trains_on_two_processes_and_one_writes(tmp_path):
    from phyassist.models.loading import load_tokenizer

    tok = load_tokenizer(load_config("smoke").model)
    rows = [{"prompt": tok.apply_chat_template([{"role": "user", "content": f"Post {i}: I feel low."}],
                                               tokenize=False, add_generation_prompt=True),
             "completion": f"Answer {i}: depression, because of the low mood.<|im_end|>"} for i in range(16)]
    atomic_write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "-m", "phyassist", "train", "--config", "smoke", "--output-dir", str(tmp_path),
           "model.name=tiny-mixtral", "train.max_steps=2", "train.save_steps=2", "train.logging_steps=1",
           "wandb.mode=disabled"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    layout = json.loads((tmp_path / "parallel.json").read_text())
    assert layout["world_size"] == 2 and not layout["fsdp"] and layout["sharded"] == 0
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter.tmp").exists()
    assert run.stdout.count("adapter written to") == 1  # rank 0 only
    # two ranks x 2 rows per step: one step covers 4 of the 16 rows
    state = json.loads((tmp_path / "checkpoints" / "trainer_state.json").read_text())
    first = next(h for h in state["log_history"] if "loss" in h)
    assert first["epoch"] == pytest.approx(4 / 16)


def test_fsdp2_shards_the_4bit_weights_and_matches_one_process(tmp_path):
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(out)]
    run = subprocess.run(cmd, env={**_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    lay = r["layout"]
    assert lay["storage_4bit"] == ["float32"]  # quant_storage follows the compute dtype under FSDP
    assert lay["params_4bit"] > 0 and lay["sharded_4bit"] == lay["params_4bit"]
    assert lay["sharded"] == lay["parameters"]
    assert lay["local_elements"] < 0.6 * lay["full_elements"]  # each of 2 ranks holds about half
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    assert r["grad_max_abs_diff"] <= 1e-4 * max(r["grad_norm"], 1e-6)


def test_quant_storage_follows_fsdp(monkeypatch):
    import torch

    from phyassist.models.loading import bnb_config, device_map

    mcfg = load_config("smoke").model
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert bnb_config(mcfg).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert bnb_config(mcfg).bnb_4bit_quant_storage == torch.float32  # smoke computes in float32
    assert device_map(mcfg) is None  # FSDP places the weights
    fixed = mcfg.model_copy(update={"quant": mcfg.quant.model_copy(update={"storage": "bfloat16"})})
    assert bnb_config(fixed).bnb_4bit_quant_storage == torch.bfloat16


def test_fsdp_with_fused_4bit_experts_is_refused(monkeypatch):
    from phyassist.models.loading import load_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config("smoke", {"model.name": "tiny-mixtral"})
    with pytest.raises(ValueError, match="FSDP QLoRA is not supported for MoE models with fused experts"):
        load_model(cfg.model, for_training=True)


def test_fsdp_swaps_bitsandbytes_optimizer_for_torch_adamw(monkeypatch, tmp_path):
    from phyassist.train.sft import sft_config

    cfg = load_config("paper", {"output_dir": str(tmp_path)})
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sft_config(cfg, tmp_path, False).optim.value == "paged_adamw_32bit"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sft_config(cfg, tmp_path, False).optim.value == "adamw_torch"  # bnb cannot step DTensors
