"""Notebook 02 runs headless on smoke (few steps), with the paper dry run and the plots."""

from pathlib import Path

from phyassist.config import load_config
from phyassist.io import atomic_write_jsonl
from phyassist.paths import NOTEBOOKS_DIR
from phyassist.pipeline import execute_notebook


def test_finetune_notebook_runs_on_smoke(tmp_path):
    from phyassist.models.chat_templates import format_prompt_completion
    from phyassist.models.loading import load_tokenizer

    tok = load_tokenizer(load_config("smoke").model)
    rec = format_prompt_completion(tok, "I feel low today.", "I'm sorry; would you like to talk about it?")
    atomic_write_jsonl(tmp_path / "data" / "train.jsonl", [rec] * 4)
    params = {"config": "smoke", "output_dir": str(tmp_path),
              "overrides": {"train.max_steps": 2, "train.logging_steps": 1, "train.save_steps": 100,
                            "model.max_seq_length": 128, "wandb.mode": "disabled"}}
    out = execute_notebook(NOTEBOOKS_DIR / "02_finetune.ipynb", tmp_path / "nb", params, timeout=600)
    text = Path(out).read_text()
    assert "31,465,472" in text and "FITS" in text
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
