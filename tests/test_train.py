"""Train stage on the CPU: answer-only labels, clear errors, resume after a kill, and real
QLoRA steps on SmolLM2 (4-bit) with a decreasing loss."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phyassist.config import load_config
from phyassist.io import atomic_write_jsonl
from phyassist.train import trainer as T

QA = [("I feel anxious before exams. What can I do?",
       "Slow breathing, short study blocks and enough sleep help; exam anxiety is common."),
      ("My friend seems sad lately, how can I help?",
       "Ask gently how they are, listen without judging, and suggest a counselor."),
      ("I cannot sleep after a stressful day.",
       "Keep a wind-down routine, avoid screens late, and write worries down before bed.")]


@pytest.fixture(scope="module")
def tok():
    from phyassist.models.loading import load_tokenizer

    return load_tokenizer(load_config("smoke").model)


def records(tok, n=12):
    from phyassist.models.chat_templates import format_prompt_completion

    return [format_prompt_completion(tok, *QA[i % len(QA)]) for i in range(n)]


def test_labels_cover_only_the_answer(tok):
    rec = records(tok, 1)[0]
    row = T.tokenize_record(tok, rec, 512)
    n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
    assert all(x == T.IGNORE for x in row["labels"][:n_prompt])
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    full = T.tokenize_record(tok, rec, 512, completion_only=False)
    assert full["labels"] == full["input_ids"]


def test_multi_turn_messages_train_on_every_assistant_turn(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "I am tired."}, {"role": "assistant", "content": "Rest a little."}]
    row = T.tokenize_record(tok, {"messages": msgs}, 512)
    text = tok.decode([t for t in row["labels"] if t != T.IGNORE])
    assert "Hello there." in text and "Rest a little." in text and "I am tired" not in text
    with pytest.raises(ValueError, match="record 3"):
        T.tokenize_record(tok, {"question": "x"}, 512, index=3)


def test_missing_data_file_is_named(tmp_path):
    cfg = load_config("smoke", {"output_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"data/train.jsonl.*phyassist data"):
        T.read_records(cfg)


def test_paper_profile_without_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(T.TrainSetupError, match="no CUDA GPU"):
        T.check_hardware(load_config("paper"))


def test_checkpoint_of_another_base_model_is_refused(tmp_path):
    ck = tmp_path / "checkpoints" / "checkpoint-20"
    ck.mkdir(parents=True)
    (ck / T.RUN_META).write_text(json.dumps({"base_model": "mixtral-8x7b-instruct"}))
    (ck / "trainer_state.json").write_text("{}")
    cfg = load_config("smoke", {"output_dir": str(tmp_path)})
    with pytest.raises(T.TrainSetupError, match="mixtral-8x7b-instruct"):
        T.last_checkpoint(tmp_path / "checkpoints", cfg)


def _cli(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "phyassist", "train", "--config", "smoke", "--output-dir", str(out),
            "model.name=tiny-mixtral", f"train.max_steps={steps}", "train.save_steps=2",
            "train.logging_steps=1", "train.save_total_limit=null", "wandb.mode=disabled"]


def _losses(out: Path, key: str = "loss") -> dict:
    state = json.loads((out / "checkpoints" / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if "loss" in h}


def test_killed_run_resumes_with_the_same_data_order(tok, tmp_path):
    """Run A straight through; run B killed (SIGKILL) after its first checkpoint, restarted:
    the per-step losses after the restart equal run A's (same batches, same RNG)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    steps = 6
    for name in ("a", "b"):
        atomic_write_jsonl(tmp_path / name / "data" / "train.jsonl", records(tok, 24))
    subprocess.run(_cli(tmp_path / "a", steps), check=True, env=env, capture_output=True, timeout=400)
    proc = subprocess.Popen(_cli(tmp_path / "b", steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / "b" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "b" / "adapter").exists()
    subprocess.run(_cli(tmp_path / "b", steps), check=True, env=env, capture_output=True, timeout=400)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert set(range(3, steps + 1)) <= set(b)
    # Same batches: the token counts match exactly; the losses up to CPU float nondeterminism
    # (~1e-4 between processes; another batch differs by ~3e-3 on this model).
    assert _losses(tmp_path / "b", "num_input_tokens_seen") == _losses(tmp_path / "a", "num_input_tokens_seen")
    for s in range(3, steps + 1):
        assert b[s] == pytest.approx(a[s], rel=5e-4), (s, a, b)
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").exists()


def test_smollm2_qlora_steps_decrease_loss_and_reload(tok, tmp_path):
    cfg = load_config("smoke", {"output_dir": str(tmp_path), "train.max_steps": 4, "train.logging_steps": 1,
                                "train.save_steps": 100, "wandb.mode": "offline",
                                "model.max_seq_length": 128})
    recs = records(tok, 1) * 8  # one example: its loss must fall step after step
    adapter = T.train(cfg, train_records=recs)
    assert (adapter / "adapter_config.json").exists()
    losses = _losses(tmp_path)
    assert losses[max(losses)] < losses[1]
    assert (tmp_path / "images" / "train_loss.png").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    model, tok2 = T.load_for_inference(cfg, adapter)
    assert tok2.padding_side == "left" and model.peft_config["default"].r == cfg.train.lora.r
