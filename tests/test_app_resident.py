"""The app's loaded model serves and trains: patient adapters train on a copy of the resident base
that shares the serving model's weights (no load from disk, no second copy), while the serving
model keeps its weights, outputs and eval mode and goes on generating; the start-up warm-up runs
one short generation and stores nothing. CPU, the embedded default model (4-bit, as the app loads it)."""

from __future__ import annotations

import json
import threading
import time
import weakref

import pytest
import torch

from phyassist.app import adapters
from phyassist.app.service import CounselorService
from phyassist.app.training_base import TrainingBase, is_4bit, unshared
from phyassist.config import load_config

USER = "alice"
NOTES = [{"date": f"2024-0{i}-01", "question": q, "symptom_type": s, "reasons": r, "advice": a}
         for i, (q, s, r, a) in enumerate([
             ("I wake at four and cannot sleep again.", "insomnia", ["Worry about work"], ["Sleep diary"]),
             ("I do not want to see my friends any more.", "low mood", ["Shame after job loss"], ["Small plans"]),
             ("My heart races on the bus.", "panic", ["Crowded places"], ["Slow breathing"])], 1)]


def _config(tmp_path, *extra):
    return load_config("smoke", [f"app.data_dir={tmp_path / 'data'}", f"app.key_file={tmp_path / 'keys' / 'k.key'}",
                                 "app.max_new_tokens=16", "app.train_max_steps=3", *extra])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The service as the app builds it (model loaded once, warm-up on), and what the store held
    right after the build."""
    svc = CounselorService.build(_config(tmp_path_factory.mktemp("resident")))
    built = {"audit": svc.store.audit_log(), "patients": svc.store.patient_count(), "chats": svc.store.list_chat(USER)}
    yield svc, built
    svc.close()


def _patient(svc, name: str) -> int:
    doc = {"format": "phyassist-patient-v1", "patient": {"name": name, "age": "40"}, "notes": NOTES}
    return svc.import_patient(USER, json.dumps(doc))


def _logits(svc, patient_id=None) -> torch.Tensor:
    model = svc.generator.model
    ids = svc.generator.tokenizer("I feel tired and worried.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        svc.bank.activate(patient_id)
        return model(ids).logits.float().clone()


def _weights(model) -> list[tuple]:
    return [(p, p.data_ptr(), p.dtype, p.detach().clone()) for p in model.parameters()]


def test_warm_up_runs_at_build_and_stores_nothing(app):
    svc, built = app
    assert svc.warmup_s is not None and svc.warmup_s > 0 and svc.warmup_first_token_s is not None
    assert built == {"audit": [], "patients": 0, "chats": []}


def test_warm_up_can_be_turned_off(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from phyassist.models import loading

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048))
    monkeypatch.setattr(loading, "load_model", lambda mcfg, for_training=False: tiny)
    calls = []
    real = CounselorService.warm_up
    monkeypatch.setattr(CounselorService, "warm_up", lambda self: calls.append(1) or real(self))
    off = CounselorService.build(_config(tmp_path / "off", "app.warmup=false"))
    assert calls == [] and off.warmup_s is None
    off.close()
    on = CounselorService.build(_config(tmp_path / "on"))
    assert calls == [1] and on.warmup_s > 0 and on.store.audit_log() == []
    on.close()


def test_job_copy_shares_weights_and_a_cast_stays_in_the_job():
    """PEFT's k-bit preparation (``param.data = param.data.to(float32)`` for 16-bit parameters,
    run by the trainer) casts the job's parameters, never the serving model's."""
    from peft import prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    serving = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).eval()
    before = _weights(serving)
    base = TrainingBase(serving)
    job = base.fresh()
    assert unshared(job, serving) == [] and unshared(base.pristine, serving) == []
    assert not {id(p) for p in job.parameters()} & {id(p) for p in serving.parameters()}
    job = prepare_model_for_kbit_training(job, use_gradient_checkpointing=True)
    job.train()
    assert {p.dtype for p in job.parameters()} == {torch.float32}
    assert [(p.data_ptr(), p.dtype) for p in serving.parameters()] == [(ptr, dt) for _p, ptr, dt, _v in before]
    assert all(torch.equal(p, v) for p, _ptr, _dt, v in before) and not serving.training


def test_dequantized_job_base_computes_what_the_4bit_one_does(app):
    """CPU full-precision training gets linears dequantized from the resident 4-bit weights."""
    svc, _built = app
    ids = svc.generator.tokenizer("I feel tired and worried.", return_tensors="pt")["input_ids"]
    four, full = svc.training_base.fresh(), svc.training_base.fresh(full_precision=True)
    assert is_4bit(four) and not is_4bit(full) and not getattr(full, "is_loaded_in_4bit", False)
    with torch.no_grad():  # training mode, as the trainer runs them
        torch.testing.assert_close(full.train()(ids).logits, four.train()(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("four_bit", [False, True], ids=["cpu-full-precision", "shared-4bit"])
def test_training_uses_the_resident_base_and_leaves_the_serving_model_alone(app, monkeypatch, four_bit):
    """No disk load; generation mid-training gives what it gave before; afterwards the serving
    model's weights (same tensors, same values), outputs and eval mode are as they were, and the
    new adapter changes its logits. ``four_bit``: train on the shared 4-bit weights themselves
    (what a GPU does; ``app.train_4bit_on_cpu``), else on dequantized linears of the job's own."""
    from transformers import AutoModelForCausalLM

    from phyassist.models import loading

    svc, _built = app
    cfg = svc.cfg.model_copy(update={"app": svc.cfg.app.model_copy(update={"train_4bit_on_cpu": four_bit})})
    monkeypatch.setattr(svc, "cfg", cfg)

    def no_disk(*args, **kwargs):
        raise AssertionError("patient training loaded a model from disk")

    monkeypatch.setattr(loading, "load_model", no_disk)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_disk)
    jobs = []
    real_fresh = svc.training_base.fresh

    def fresh(full_precision=False):
        model = real_fresh(full_precision)
        jobs.append((weakref.ref(model), is_4bit(model), unshared(model, svc.training_base.pristine)))
        return model

    monkeypatch.setattr(svc.training_base, "fresh", fresh)
    mid_step, resume = threading.Event(), threading.Event()
    real_progress = adapters.progress_callback

    def pausing_progress(status):  # holds the job after its first optimizer step
        cb = real_progress(status)
        step_end = cb.on_step_end

        def on_step_end(args, state, control, **kw):
            step_end(args, state, control, **kw)
            if state.global_step == 1:
                mid_step.set()
                resume.wait(300)

        cb.on_step_end = on_step_end
        return cb

    monkeypatch.setattr(adapters, "progress_callback", pausing_progress)

    pid = _patient(svc, f"Resident {four_bit}")
    model = svc.generator.model
    prompt = "<|im_start|>user\nI sleep badly.<|im_end|>\n<|im_start|>assistant\n"
    ref_text, ref_logits, before = svc.generator.complete(prompt, 12), _logits(svc), _weights(model)

    status = svc.start_training(USER, pid)
    try:
        deadline = time.time() + 300
        while not mid_step.wait(0.2) and status.state in ("queued", "running") and time.time() < deadline:
            pass
        assert mid_step.is_set(), f"training did not reach its first step: {status.text()}"
        assert status.state == "running"
        assert svc.generator.complete(prompt, 12) == ref_text  # the serving model generates meanwhile
        torch.testing.assert_close(_logits(svc), ref_logits, rtol=0, atol=0)
        assert not any(m.training for m in model.modules())
    finally:
        resume.set()
    deadline = time.time() + 300
    while status.state in ("queued", "running") and time.time() < deadline:
        time.sleep(0.2)
    assert status.state == "done", status.text()

    (job_ref, job_4bit, job_unshared), = jobs
    assert job_4bit == four_bit
    assert (job_unshared == []) == four_bit  # 4 bit: all shared; full precision: dequantized linears own
    assert status.base_s < 10
    assert [(p.data_ptr(), p.dtype) for p in model.parameters() if any(p is q for q, *_ in before)] == \
        [(ptr, dt) for _p, ptr, dt, _v in before]
    assert all(torch.equal(p, v) for p, _ptr, _dt, v in before)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(_logits(svc), ref_logits, rtol=0, atol=0)
    assert svc.generator.complete(prompt, 12) == ref_text
    with_adapter = _logits(svc, pid)
    assert (with_adapter - ref_logits).abs().max() > 0, "the trained adapter does not change the logits"
    assert torch.equal(_logits(svc, pid), with_adapter) and not any(m.training for m in model.modules())
    svc.bank.activate(None)
    assert job_ref() is None, "the job's model outlived the job"


def test_gpu_warm_up_prompt_fills_the_context_budget(app):
    """On a GPU the warm-up prefills prompts of several lengths, the longest filling the budget."""
    from phyassist.app.assistant import context_budget

    svc = app[0]
    g = svc.generator
    n = lambda text: len(g.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    budget = context_budget(g.max_positions, svc.a.context_tokens, svc.a.max_new_tokens)
    short, full, half = n(svc.warmup_prompt()), n(svc.warmup_prompt(1.0)), n(svc.warmup_prompt(0.5))
    assert short < budget / 4
    assert 0.9 * budget <= full <= budget
    assert 0.4 * budget <= half <= 0.5 * budget
