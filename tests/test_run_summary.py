"""What a reviewer reads without wandb: the run summary, and model cards that name the base model."""

import json

from phyassist.config import load_config
from phyassist.runinfo import final_metrics, write_run_summary
from phyassist.train.callbacks import name_base_model, step_line

HISTORY = [{"loss": 3.4, "learning_rate": 2e-4, "step": 5, "epoch": 0.1},
           {"loss": 2.9, "learning_rate": 1e-4, "step": 10, "epoch": 0.2},
           {"eval_loss": 3.1, "step": 10, "epoch": 0.2},
           {"loss": 3.0, "learning_rate": 0.0, "step": 15, "epoch": 0.3},
           {"train_runtime": 12.5, "train_loss": 3.1, "step": 15, "epoch": 0.3}]


def test_final_metrics_keep_last_and_best():
    m = final_metrics(HISTORY)
    assert m["loss"] == 3.0 and m["min_loss"] == 2.9 and m["min_loss_step"] == 10
    assert m["eval_loss"] == 3.1 and m["train_runtime"] == 12.5 and m["step"] == 15


def test_summary_written_beside_wandb(tmp_path):
    cfg = load_config("smoke", {"output_dir": str(tmp_path)})
    state = tmp_path / "checkpoints" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"log_history": HISTORY}))
    (tmp_path / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    png = tmp_path / "images" / "train_loss.png"
    md = write_run_summary(cfg, tmp_path, state, [png])
    data = json.loads((tmp_path / "run_summary.json").read_text())
    assert data["final_metrics"]["min_loss"] == 2.9 and data["plots"] == ["images/train_loss.png"]
    assert data["wandb"]["offline_runs"] == ["wandb/offline-run-20260101_000000-abc"]
    text = md.read_text()
    assert "| learning_rate | 0.0002 |" in text and "![train_loss](images/train_loss.png)" in text
    assert "wandb sync wandb/offline-run-20260101_000000-abc" in text


TRL_CARD = """---
library_name: transformers
model_name: checkpoints
---

# Model Card for checkpoints

This model is a fine-tuned version of [None](https://huggingface.co/None).
"""
PEFT_CARD = """---
base_model: /root/.cache/phyassist/smollm2-135m-instruct
library_name: peft
tags:
- base_model:adapter:/root/.cache/phyassist/smollm2-135m-instruct
- lora
---

# Model Card for Model ID
"""


def test_cards_name_the_base_model(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "README.md").write_text(TRL_CARD)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text(PEFT_CARD)
    assert name_base_model(tmp_path / "ckpt", "smollm2-135m-instruct")
    assert "fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/" \
           "HuggingFaceTB/SmolLM2-135M-Instruct)" in (tmp_path / "ckpt" / "README.md").read_text()
    name_base_model(tmp_path / "adapter", "smollm2-135m-instruct")
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in text and "/root/.cache" not in text
    assert "- base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct\n" in text
    # a model without a Hub id (the tiny test models) is named as configured
    (tmp_path / "ckpt" / "README.md").write_text(TRL_CARD)
    name_base_model(tmp_path / "ckpt", "tiny-mixtral")
    assert "fine-tuned version of `tiny-mixtral`." in (tmp_path / "ckpt" / "README.md").read_text()
    assert name_base_model(tmp_path / "ckpt", "tiny-mixtral") == []  # nothing left to fix


def test_step_line():
    class State:
        global_step, max_steps = 10, 30

    line = step_line(State, {"loss": 3.35, "learning_rate": 2e-4, "tokens_per_s": 2.5, "epoch": 0.1})
    assert line == "[train] step 10/30 · loss 3.350 · lr 2.0e-04 · 2.5 tokens/s"
