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
from phyassist.models.inference import ADAPTER_META, load_for_inference
from phyassist.train import sft
from phyassist.train.checks import TrainSetupError, check_hardware, last_checkpoint
from phyassist.train.records import IGNORE, read_records, tokenize_record
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
    row = tokenize_record(tok, rec, 512)
    n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
    assert all(x == IGNORE for x in row["labels"][:n_prompt])
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    full = tokenize_record(tok, rec, 512, completion_only=False)
    assert full["labels"] == full["input_ids"]


def test_multi_turn_messages_train_on_every_assistant_turn(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "I am tired."}, {"role": "assistant", "content": "Rest a little."}]
    row = tokenize_record(tok, {"messages": msgs}, 512)
    text = tok.decode([t for t in row["labels"] if t != IGNORE])
    assert "Hello there." in text and "Rest a little." in text and "I am tired" not in text
    with pytest.raises(ValueError, match="record 3"):
        tokenize_record(tok, {"question": "x"}, 512, index=3)


def test_missing_data_file_is_named(tmp_path):
    cfg = load_config("smoke", {"output_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"data/train.jsonl.*phyassist data"):
        read_records(cfg)


def test_paper_profile_without_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainSetupError, match="no CUDA GPU"):
        check_hardware(load_config("paper"))


def test_checkpoint_of_another_base_model_is_refused(tmp_path):
    ck = tmp_path / "checkpoints" / "checkpoint-20"
    ck.mkdir(parents=True)
    (ck / ADAPTER_META).write_text(json.dumps({"base_model": "mixtral-8x7b-instruct"}))
    (ck / "trainer_state.json").write_text("{}")
    cfg = load_config("smoke", {"output_dir": str(tmp_path)})
    with pytest.raises(TrainSetupError, match="mixtral-8x7b-instruct"):
        last_checkpoint(tmp_path / "checkpoints", cfg)


def test_resume_passes_over_a_checkpoint_killed_while_it_was_written(tmp_path):
    """A run killed while saving leaves a checkpoint folder without (or with half of) the
    trainer_state.json transformers writes last; resuming takes the checkpoint before it."""
    from phyassist.io import last_complete_checkpoint

    ckpts = tmp_path / "checkpoints"
    for step, state in ((2, "{}"), (4, '{"global_st'), (6, None)):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    cfg = load_config("smoke", {"output_dir": str(tmp_path)})
    assert last_checkpoint(ckpts, cfg) == str(ckpts / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path / "none") is None


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
    # Same batches: the token counts match exactly. The losses only up to the run-to-run noise of
    # this CPU stack: two identical fresh processes already differ at step 2, before any kill
    # (measured 2026-11-24, also at the previous commits, one thread or not: up to 6e-4 relative
    # by step 6), so a tighter bound made this test fail now and then.
    assert _losses(tmp_path / "b", "num_input_tokens_seen") == _losses(tmp_path / "a", "num_input_tokens_seen")
    for s in range(3, steps + 1):
        assert b[s] == pytest.approx(a[s], rel=2e-3), (s, a, b)
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
    model, tok2 = load_for_inference(cfg, adapter)
    assert tok2.padding_side == "left" and model.peft_config["default"].r == cfg.train.lora.r


class _SpoilAfter:
    """Callback that ruins the LoRA weights from step ``start`` on, so the last evaluations are the
    worst and the best (lowest eval loss) checkpoint is an earlier one."""

    def __init__(self, start: int):
        from transformers import TrainerCallback

        self.start, self.cb = start, TrainerCallback()
        self.cb.on_step_end = self.on_step_end

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        if state.global_step >= self.start:
            gen = torch.Generator().manual_seed(state.global_step)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        return control


def test_best_eval_loss_checkpoint_is_kept_and_loaded(tok, tmp_path):
    """load_best_model_at_end: the lowest-eval-loss checkpoint survives save_total_limit=2 and the
    final adapter holds ITS weights (not the last step's), so reloading it gives the best eval loss."""
    import torch
    from safetensors.torch import load_file

    steps = 4
    cfg = load_config("smoke", {"output_dir": str(tmp_path), "model.name": "tiny-mixtral",
                                "model.quant.load_in_4bit": False,
                                "model.max_seq_length": 128, "train.max_steps": steps, "train.eval_steps": 1,
                                "train.save_steps": 1, "train.logging_steps": 1, "train.save_total_limit": 2,
                                "train.load_best_model_at_end": True, "train.learning_rate": 1e-3,
                                "wandb.mode": "disabled"})
    val = records(tok, 2)[1:]
    adapter = T.train(cfg, train_records=records(tok, 8), eval_records=val, callbacks=[_SpoilAfter(3).cb])
    state = json.loads((tmp_path / "checkpoints" / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    assert sorted(evals) == list(range(1, steps + 1))
    best = min(evals, key=evals.get)
    assert best < steps and evals[steps] > evals[best], evals  # the test means something: last is not best
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best}"
    assert state["best_metric"] == pytest.approx(evals[best])
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert kept == sorted({best, steps}), kept  # rotation kept the best one beside the newest
    meta = json.loads((adapter / ADAPTER_META).read_text())
    assert meta["weights"] == "best" and meta["best_checkpoint"] == f"checkpoint-{best}"
    final = load_file(adapter / "adapter_model.safetensors")
    ck = {s: load_file(tmp_path / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors") for s in kept}
    assert final.keys() == ck[best].keys()
    assert all(torch.equal(final[k], ck[best][k]) for k in final)
    assert not all(torch.equal(final[k], ck[steps][k]) for k in final)
    model, _ = load_for_inference(cfg, adapter)  # reloaded: its eval loss is the best one
    row = tokenize_record(tok, val[0], 128)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    # the tiny random MoE model's loss differs by ~2e-3 between the Trainer's evaluation and a plain
    # forward pass; the spoiled last step is ~0.1 worse, so this still tells best from last
    assert abs(float(loss) - evals[best]) < (evals[steps] - evals[best]) / 10, (float(loss), evals)


def test_paper_path_trains_tiny_mixtral_with_the_compiled_attention_half(tok, tmp_path):
    """train() with the paper profile's model path (4-bit grouped experts, attention-only
    checkpointing, compiled attention half, paged AdamW over flat LoRA tensors): records of
    several lengths, a finite decreasing loss, an adapter, and the compiled graph and the flat
    optimizer really ran."""
    import math

    import torch
    from torch._dynamo.utils import counters

    import phyassist.models.mixtral4bit.checkpointing as ck

    torch._dynamo.reset()
    ck._compiled.clear()
    counters.clear()
    cfg = load_config("smoke", {"output_dir": str(tmp_path), "model.name": "tiny-mixtral",
                                "model.quant.experts_method": "grouped", "train.gradient_checkpointing": "attention",
                                "train.compile_attention": True, "train.lora.target_router": True,
                                "train.max_steps": 4, "train.save_steps": 4, "train.logging_steps": 1,
                                "train.learning_rate": 1e-3, "wandb.mode": "disabled",
                                "train.optim": "paged_adamw_32bit", "train.flat_optimizer": True})
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, model=None, **kw):
            seen.append(type(getattr(optimizer, "optimizer", optimizer)).__name__)
            # the study's objective: no load-balancing loss, so no router logits asked for
            seen.append(model.config.get_text_config().output_router_logits)

    adapter = T.train(cfg, train_records=records(tok, 16), callbacks=[Spy()])
    assert seen[1::2] == [False] * 4, seen
    assert seen and all(name.startswith("Flat") for name in seen[::2]), seen
    losses = _losses(tmp_path)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
    assert losses[4] < losses[1], losses
    assert counters["stats"]["unique_graphs"] >= 1 and ck._compiled
    assert (adapter / "adapter_model.safetensors").exists()


def test_deferred_metrics_log_what_trl_logs(tok, tmp_path, monkeypatch):
    """The trainer keeps TRL's per-micro-batch metrics (entropy, token accuracy, token counts, MoE
    aux loss) and the Trainer's input-token count on the device until the next log: no host read
    in the loss or the token count (the model's own forward aside), which on a GPU stalls every
    micro-batch. The logs are those of TRL's own path (the same run with deferral off)."""
    import torch

    base = sft.trainer_class()
    reads = {"on": False, "n": 0}

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            reads["n"] += reads["on"]
            return real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        counted(name)

    def counting(on: bool):
        def hook(*_):
            reads["on"] = on
        return hook

    def run(defer: bool):
        class Watched(base):
            defer_metrics = defer

            def compute_loss(self, model, *a, **k):
                # the model's forward (transformers' mask creation reads the mask) is not counted
                hooks = [model.register_forward_pre_hook(counting(False)), model.register_forward_hook(counting(True))]
                reads["on"] = True
                try:
                    return super().compute_loss(model, *a, **k)
                finally:
                    reads["on"] = False
                    for h in hooks:
                        h.remove()

            def _track_num_input_tokens(self, inputs):
                reads["on"] = True
                try:
                    return super()._track_num_input_tokens(inputs)
                finally:
                    reads["on"] = False

        monkeypatch.setattr(T, "trainer_class", lambda: Watched)
        reads["n"] = 0
        out = tmp_path / ("deferred" if defer else "trl")
        cfg = load_config("smoke", {"output_dir": str(out), "model.name": "tiny-mixtral",
                                    "model.quant.load_in_4bit": False, "model.max_seq_length": 128,
                                    "train.max_steps": 3, "train.gradient_accumulation_steps": 2,
                                    "train.per_device_train_batch_size": 2, "train.logging_steps": 1,
                                    "train.save_steps": 2, "train.router_aux_loss_coef": 0.02,
                                    "train.learning_rate": 1e-3, "wandb.mode": "disabled"})
        T.train(cfg, train_records=records(tok, 12))
        ckpt = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        logs = json.loads((out / "checkpoints" / "trainer_state.json").read_text())["log_history"]
        return [h for h in logs if "loss" in h], ckpt["num_input_tokens_seen"], reads["n"]

    logs, ckpt_tokens, deferred_reads = run(True)  # first: the run must not depend on what ran before
    trl_logs, trl_ckpt_tokens, trl_reads = run(False)
    assert deferred_reads == 0 and trl_reads >= 3 * 2 * 4, (deferred_reads, trl_reads)
    assert ckpt_tokens == trl_ckpt_tokens > 0  # a checkpoint's state counts every token seen so far
    assert len(logs) == len(trl_logs) == 3
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "num_input_tokens_seen", "aux_loss")
    for ours, theirs in zip(logs, trl_logs):
        for k in keys:
            assert ours[k] == pytest.approx(theirs[k], rel=1e-6), (k, ours, theirs)
