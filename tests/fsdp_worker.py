"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): the kit's
4-bit model with LoRA, sharded by FSDP2 as ``accelerate launch`` with configs/accelerate/fsdp_qlora.yaml
does on GPUs, against the same model unsharded. Writes rank 0's findings as JSON to argv[1]."""

import json
import os
import sys

os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` sets for an FSDP config

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from phyassist.config import load_config  # noqa: E402
from phyassist.models.loading import load_model, load_tokenizer  # noqa: E402
from phyassist.train.callbacks import parallel_layout  # noqa: E402
from phyassist.train.lora import apply_lora  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    cfg = load_config("smoke", {"train.lora.dropout": 0.0})
    torch.manual_seed(0)
    model = apply_lora(load_model(cfg.model, for_training=True), cfg.train.lora)
    model.train()
    tok = load_tokenizer(cfg.model)
    batch = tok(["I have not slept properly for weeks and I feel on edge all the time."], return_tensors="pt")
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    ref_loss = model(**batch, labels=batch["input_ids"]).loss
    ref_loss.backward()
    ref_grad = dict(model.named_parameters())[name].grad.clone()
    model.zero_grad(set_to_none=True)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grad = dict(model.named_parameters())[name].grad.full_tensor()
    layout = parallel_layout(model)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"layout": layout, "ref_loss": ref_loss.item(), "loss": loss.item(),
                       "grad_max_abs_diff": (grad - ref_grad).abs().max().item(),
                       "grad_norm": ref_grad.norm().item()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
