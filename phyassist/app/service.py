"""The counselor assistant without its UI: store, model, adapters and background training
joined into the operations a counselor performs. The Gradio UI, the notebook and the tests
call these; every operation validates its input before it changes anything.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from phyassist.app import notes as N
from phyassist.app.adapters import (AdapterBank, AdapterLimit, TrainJob, TrainQueue, adapter_folder,
                                    prune_versions, train_patient_adapter, versions_on_disk)
from phyassist.app.assistant import (ANALYSIS_PREFIX, CHAT_SYSTEM, SYSTEM, Generator, analysis_task,
                                     build_prompt, context_budget, item_prefix, regenerate_all_task,
                                     regenerate_item_task)
from phyassist.app.private import sweep_workdirs
from phyassist.app.storage import Store
from phyassist.app.training_base import TrainingBase, is_4bit

log = logging.getLogger(__name__)
WARMUP_SAID = "I have been sleeping badly for a few weeks and I feel tired at work."  # made up, no patient's
WARMUP_TOKENS = 8
WARMUP_FRACTIONS = (1.0, 0.5, 0.25, 0.125, None)  # shares of the context budget warmed up on a GPU


@dataclass
class AnalysisUpdate:
    """One step of a streamed analysis: the text so far, and at the end the draft as stored
    (``final``; ``ok`` False when the result could not be used as asked: unparsed text, a draft that
    changed meanwhile)."""

    text: str
    draft: dict[str, Any] | None = None
    message: str = ""
    ok: bool = True
    final: bool = False


def resolve_data_dir(cfg, data_dir: str | None = None) -> Path:
    return Path(data_dir or os.environ.get("PHYASSIST_APP_DATA") or cfg.app.data_dir).expanduser()


def open_store(cfg, data_dir: str | Path | None = None) -> Store:
    a = cfg.app
    return Store.open(resolve_data_dir(cfg, data_dir), database=a.database_url, key_env=a.key_env,
                      key_file=a.key_file)


def sweep_leftovers(store: Store) -> list[str]:
    """At start-up: remove what a killed process left in plaintext or half-written: private working
    folders no live process holds (training checkpoints, upload cache), adapter version folders no
    record names (a job killed before its record, or after it but before the old version went).
    Returns what was removed (names only)."""
    removed = [f".tmp/{name}" for name in sweep_workdirs(store.data_dir)]
    recorded = dict(store.adapter_records())
    root = store.data_dir / "adapters"
    for folder in sorted(root.glob("patient_*")) if root.is_dir() else []:
        pid = folder.name.removeprefix("patient_")
        if pid.isdigit() and (versions_on_disk(store.data_dir, int(pid)) or any(folder.glob(".v*.tmp"))):
            removed += [f"{folder.name}/{n}" for n in prune_versions(store.data_dir, int(pid), recorded.get(int(pid)))]
    if removed:
        log.warning("start-up sweep removed %d leftover(s) of an earlier run: %s", len(removed), ", ".join(removed))
    return removed


def patient_training_config(cfg, patient_id: int, load_in_4bit: bool | None = None):
    """The run config for one patient's adapter: the app's limits, no wandb, no resume, no bias
    training (a trained bias would change the resident base's shared tensor in place).
    ``load_in_4bit``: what the model handed to the trainer is, when it is not loaded from disk."""
    import torch

    from phyassist.config import apply_overrides, validate

    a = cfg.app
    over = {"name": f"patient-{int(patient_id)}", "wandb.mode": "disabled", "train.max_steps": a.train_max_steps,
            "train.save_steps": a.train_max_steps, "train.logging_steps": 1, "train.resume": False,
            "train.eval_steps": None, "train.group_by_length": False, "train.lora.r": a.train_lora_r,
            "train.lora.alpha": 2 * a.train_lora_r, "train.lora.bias": "none",
            "train.per_device_train_batch_size": a.train_batch_size, "train.gradient_accumulation_steps": 1,
            "train.save_total_limit": 1,
            # a short job on notes of ever-new lengths: compiling would cost more than it saves; the
            # resident model swaps adapters in place, so its LoRA tensors stay plain tensors
            "train.compile_attention": False, "train.attention_memory_budget": None, "train.flat_optimizer": False}
    if not torch.cuda.is_available():
        over.update({"train.optim": "adamw_torch", "train.gradient_checkpointing": False, "train.bf16": False})
        if not a.train_4bit_on_cpu:
            over["model.quant.load_in_4bit"] = False
    if load_in_4bit is not None:
        over["model.quant.load_in_4bit"] = load_in_4bit
    return validate(apply_overrides(cfg.model_dump(mode="json"), over), "app patient training")


def analysis_message(outcome: str, parsed: dict[str, Any]) -> str:
    """The status line at the end of an analysis; ``outcome``: what became of the draft there was
    when it started (same, gone, edited, replaced, started)."""
    def unparsed(where: str) -> str:
        return (f"The model's text could not be split into items ({parsed['problem']}); the raw text is kept "
                f"{where}. Add items by hand or regenerate.")

    msg = "Draft ready: review, edit and save." if parsed["ok"] else unparsed("in the draft")
    if outcome == "gone":
        return "The draft there was when you pressed Analyze was saved or discarded meanwhile. " + msg
    if outcome in ("edited", "replaced", "started"):
        change = {"edited": "was edited", "replaced": "was replaced by another one", "started": "was started"}
        return (f"While the model wrote, the draft {change[outcome]} (in this or another session). That draft is "
                "kept; this analysis waits beside it: press 'Use the other analysis' to swap them, or "
                "'Dismiss it'." + ("" if parsed["ok"] else " " + unparsed("with it")))
    return msg


class CounselorService:
    """Where a patient's adapter is trained: on a copy of ``training_base`` (the loaded model's
    weights, see :mod:`phyassist.app.training_base`; what :meth:`serve` sets up), else on
    ``train_base(run_config)`` when given (a function returning a fresh base model: benchmarks
    compare with a freshly built one), else on ``cfg.model`` loaded from disk by the kit's trainer.
    ``train_tokenizer``: the tokenizer for training (else loaded per job)."""

    def __init__(self, cfg, store: Store, generator: Generator | None, bank: AdapterBank | None, *,
                 train_base: Callable[[Any], Any] | None = None, train_tokenizer=None,
                 training_base: TrainingBase | None = None):
        self.cfg = cfg
        self.a = cfg.app
        self.store = store
        self.generator = generator
        self.bank = bank
        self.train_base = train_base
        self.train_tokenizer = train_tokenizer
        self.training_base = training_base
        self.warmup_s: float | None = None
        self.warmup_first_token_s: float | None = None
        self.warmup_prompt_tokens: list[int] | None = None
        self.trainer = TrainQueue(self._run_training)

    @classmethod
    def build(cfg_cls, cfg, data_dir: str | Path | None = None, *, with_model: bool = True) -> "CounselorService":
        """Open the store (key checked first), then load the model once."""
        store = open_store(cfg, data_dir)
        sweep_leftovers(store)
        if not with_model:
            return cfg_cls(cfg, store, None, None)
        from phyassist.models.inference import load_for_inference
        from phyassist.models.loading import load_tokenizer

        model, tokenizer = load_for_inference(cfg)
        return cfg_cls.serve(cfg, store, model, tokenizer, load_tokenizer(cfg.model, padding_side="right"))

    @classmethod
    def serve(cfg_cls, cfg, store: Store, model, tokenizer, train_tokenizer=None) -> "CounselorService":
        """The service around a loaded model: the resident training base is taken before any
        adapter (the kit's, a patient's) is added to the model, then the adapters and the generator
        are set up and, with ``app.warmup``, one short generation warms the model up."""
        model.eval()
        training_base = TrainingBase(model)
        bank = AdapterBank(model, store.cipher, store.data_dir, max_loaded=cfg.app.max_loaded_adapters,
                           kit_adapter=cfg.app.adapter, locate=store.adapter_location)
        generator = Generator(model, tokenizer, repetition_penalty=cfg.app.repetition_penalty,
                              activate=bank.activate)
        svc = cfg_cls(cfg, store, generator, bank, train_tokenizer=train_tokenizer, training_base=training_base)
        if cfg.app.warmup:
            svc.warm_up()
        return svc

    # --- patients ------------------------------------------------------------------------
    def create_patient(self, user: str, values: dict[str, Any]) -> int:
        return self.store.create_patient(user, N.clean_patient_fields(values, self.a.max_input_chars))

    def update_patient(self, user: str, patient_id: int, values: dict[str, Any]) -> None:
        self.store.update_patient(user, patient_id, N.clean_patient_fields(values, self.a.max_input_chars))

    def search(self, user: str, query: str = "") -> list[dict[str, Any]]:
        return self.store.list_patients(user, N.check_text("search", query, 200, required=False))

    def import_patient(self, user: str, text: str) -> int:
        """Import a JSON export; validated completely first, written in one transaction."""
        fields, notes = N.parse_import(text, self.import_limits())
        return self.store.import_patient(user, fields, notes)

    def import_limits(self) -> N.ImportLimits:
        a = self.a
        return N.ImportLimits(max_chars=a.max_input_chars, max_notes=a.max_import_notes, max_items=a.max_note_items)

    def export_markdown(self, user: str, patient_id: int) -> str:
        md = N.export_markdown(self.store.get_patient(user, patient_id), self.store.list_notes(user, patient_id))
        self.store.audit(user, "export_markdown", f"patient:{int(patient_id)}")
        return md

    def export_json(self, user: str, patient_id: int) -> str:
        out = N.export_json(self.store.get_patient(user, patient_id), self.store.list_notes(user, patient_id))
        self.store.audit(user, "export_json", f"patient:{int(patient_id)}")
        return out

    def model_label(self, patient_id: int | None) -> str:
        if patient_id is not None and self.store.adapter_for(patient_id) is not None:
            return f"patient adapter #{int(patient_id)}"
        return "kit fine-tuned adapter" if self.a.adapter else f"base model ({self.cfg.model.name})"

    # --- analysis ------------------------------------------------------------------------
    def _require_model(self) -> Generator:
        if self.generator is None:
            raise RuntimeError("no model loaded (service built with with_model=False)")
        return self.generator

    def _prompt(self, user: str, patient_id: int, task: str, prefix: str, max_new: int):
        self._require_model()  # before any record is read
        patient = self.store.get_patient(user, patient_id)
        return self._render(task, patient, self.store.list_notes(user, patient_id), prefix, max_new)

    def _render(self, task: str, patient: dict | None, notes: list[dict], prefix: str, max_new: int):
        g = self._require_model()
        budget = context_budget(g.max_positions, self.a.context_tokens, max_new)
        return build_prompt(g.tokenizer, SYSTEM, task, patient, notes, self.a.context_notes, budget, prefix)

    def _on_gpu(self) -> bool:
        return any(p.is_cuda for p in self._require_model().model.parameters())

    def _count_tokens(self, text: str) -> int:
        return len(self._require_model().tokenizer(text, add_special_tokens=False)["input_ids"])

    def warmup_prompt(self, fraction: float | None = None) -> str:
        """A warm-up analysis prompt of made-up words: the short one, or (``fraction``) the words
        repeated until the prompt fills that share of the context budget."""
        prompt, _ = self._render(analysis_task(WARMUP_SAID), None, [], ANALYSIS_PREFIX, self.a.max_new_tokens)
        if fraction is None:
            return prompt
        budget = context_budget(self._require_model().max_positions, self.a.context_tokens, self.a.max_new_tokens)
        repeats = max(1, (int(budget * fraction) - self._count_tokens(prompt))
                      // max(1, self._count_tokens(" " + WARMUP_SAID)))
        prompt, _ = self._render(analysis_task(" ".join([WARMUP_SAID] * repeats)), None, [], ANALYSIS_PREFIX,
                                 self.a.max_new_tokens)
        return prompt

    def warm_up(self) -> float:
        """Short analyses of made-up words through the prompt and streaming code of a real one, at
        start-up, so that the first counselor's first token does not pay for GPU start-up (kernels
        loaded on first use, allocator, cuBLAS; measured in bench/app_gpu.md). On a GPU, prompts of
        several lengths up to the whole context budget: each prefill length picks its own GEMM kernels,
        so one full-length warm-up does not cover them. No patient, nothing stored or audited. Returns
        its seconds (also in ``warmup_s``)."""
        fractions = WARMUP_FRACTIONS if self._on_gpu() else (None,)
        prompts = [self.warmup_prompt(f) for f in fractions]
        self.warmup_prompt_tokens = [self._count_tokens(p) for p in prompts]
        t0 = time.perf_counter()
        first = None
        for prompt in prompts:
            for _piece in self._require_model().stream(prompt, WARMUP_TOKENS, None, guided=self.a.guided_format):
                first = first if first is not None else time.perf_counter() - t0
        self.warmup_s, self.warmup_first_token_s = time.perf_counter() - t0, first
        log.info("model warm-up: %d prompt(s) of %s tokens, %d new tokens each, in %.2f s", len(prompts),
                 self.warmup_prompt_tokens, WARMUP_TOKENS, self.warmup_s)
        return self.warmup_s

    def stream_analysis(self, user: str, patient_id: int, said: str) -> Iterator[AnalysisUpdate]:
        """Stream a draft for what the patient said. At the end it replaces the draft there was when
        the model started; if that draft was changed meanwhile (an edit, another analysis, this
        session or another), the changed draft is kept and the new one waits beside it as an
        alternative (:meth:`use_alternative`, :meth:`dismiss_alternative`): nothing is overwritten."""
        said = N.check_text("What the patient said", said, self.a.max_input_chars)
        prompt, report = self._prompt(user, patient_id, analysis_task(said), ANALYSIS_PREFIX, self.a.max_new_tokens)
        start = N.draft_stamp(self.store.get_draft(user, patient_id))
        text = ANALYSIS_PREFIX
        yield AnalysisUpdate(text, message=f"Context: {report.text()}")
        for piece in self._require_model().stream(prompt, self.a.max_new_tokens, patient_id,
                                                  guided=self.a.guided_format):
            text += piece
            yield AnalysisUpdate(text)
        parsed = N.parse_analysis(text)
        new = N.new_draft(said, parsed, report.text())
        outcome: list[str] = []

        def apply(latest):  # one locked read-modify-write: replace only the draft the model started from
            stamp = N.draft_stamp(latest)
            if stamp == start or stamp is None:  # unchanged, or saved/discarded meanwhile: nothing to keep
                outcome.append("same" if stamp == start else "gone")
                return new
            outcome.append("edited" if start and stamp[0] == start[0] else "replaced" if start else "started")
            return N.add_alternative(latest, new)

        draft = self.store.update_draft(user, patient_id, apply)
        kept = outcome[0] in ("edited", "replaced", "started")
        yield AnalysisUpdate(text, N.with_ids(draft) if kept else draft, analysis_message(outcome[0], parsed),
                             ok=parsed["ok"] and not kept, final=True)

    @staticmethod
    def _same_draft(base: dict[str, Any], latest: dict[str, Any] | None, what: str) -> dict[str, Any]:
        """``latest`` if it is still the draft ``base`` was read from, else DraftChanged."""
        if latest is None:
            raise N.DraftChanged(f"the draft was saved or discarded while {what}; the model's text was not stored")
        latest = N.with_ids(latest)
        if latest.get("draft_id") != base.get("draft_id") or latest["question"] != base["question"]:
            raise N.DraftChanged(f"a new analysis replaced the draft while {what}; the model's text was not stored")
        return latest

    def regenerate_all(self, user: str, patient_id: int) -> Iterator[AnalysisUpdate]:
        """Rewrite the whole draft from its edits and comments. Edits made while the model writes
        (this session or another) are merged in, not overwritten: see :func:`notes.merge_regenerated`."""
        base = self._draft(user, patient_id)
        prompt, report = self._prompt(user, patient_id, regenerate_all_task(base), ANALYSIS_PREFIX,
                                      self.a.max_new_tokens)
        text = ANALYSIS_PREFIX
        for piece in self._require_model().stream(prompt, self.a.max_new_tokens, patient_id,
                                                  guided=self.a.guided_format):
            text += piece
            yield AnalysisUpdate(text)
        parsed = N.parse_analysis(text)
        what = "it was regenerating"
        kept: list[str] = []

        def apply(latest):
            latest = self._same_draft(base, latest, what)
            if not parsed["ok"]:
                return dict(latest, raw=parsed["raw"])
            new = N.new_draft(base["question"], parsed, report.text())
            if latest.get("version") == base.get("version"):
                return N.keep_alternatives(dict(new, draft_id=base["draft_id"]), latest)
            merged, keep = N.merge_regenerated(base, latest, new)
            kept.extend(keep)
            return N.keep_alternatives(merged, latest)

        try:
            stored = self.store.update_draft(user, patient_id, apply)
        except N.DraftChanged as exc:
            yield AnalysisUpdate(text, self.get_draft(user, patient_id), f"Regenerated, but {exc}.", ok=False,
                                 final=True)
            return
        if not parsed["ok"]:
            yield AnalysisUpdate(text, stored, f"Regenerated text could not be split into items ({parsed['problem']}); "
                                               "your items are unchanged, the raw text is kept.", ok=False, final=True)
            return
        msg = "Draft regenerated with your edits and comments."
        if kept:
            msg += (f" Changes made while it was regenerating were kept: {', '.join(kept)} (check them against "
                    "the new items).")
        yield AnalysisUpdate(text, stored, msg, final=True)

    def regenerate_item(self, user: str, patient_id: int, ref: str) -> Iterator[AnalysisUpdate]:
        base = self._draft(user, patient_id)
        before = N.get_item(base, ref)  # validates the ref before any generation
        prompt, _ = self._prompt(user, patient_id, regenerate_item_task(base, ref), item_prefix(ref),
                                 self.a.item_max_new_tokens)
        text = ""
        for piece in self._require_model().stream(prompt, self.a.item_max_new_tokens, patient_id):
            text += piece
            yield AnalysisUpdate(text)
        new_text = N.parse_item(text)
        if not new_text:
            yield AnalysisUpdate(text, self.get_draft(user, patient_id),
                                 f"The model returned no text for {ref}; it is unchanged.", ok=False, final=True)
            return
        where: list[str] = []

        def apply(latest):  # the item is found by its id: other items may have moved meanwhile
            latest = self._same_draft(base, latest, f"{ref} was regenerating")
            now = N.ref_of(latest, before["id"])
            if now is None:
                raise N.DraftChanged(f"{ref} was deleted while it was regenerating; the model's text was not stored")
            if N.get_item(latest, now)["text"] != before["text"]:
                raise N.DraftChanged(f"{ref} was edited while it was regenerating; your edit is kept")
            where.append(now)
            return N.set_item(latest, now, text=new_text)

        try:
            stored = self.store.update_draft(user, patient_id, apply)
        except N.DraftChanged as exc:
            yield AnalysisUpdate(text, self.get_draft(user, patient_id), f"Not applied: {exc}.", ok=False, final=True)
            return
        moved = f" (now {where[0]})" if where[0] != ref else ""
        yield AnalysisUpdate(text, stored, f"{ref} regenerated{moved}.", final=True)

    # --- drafts --------------------------------------------------------------------------
    def _draft(self, user: str, patient_id: int) -> dict[str, Any]:
        draft = self.get_draft(user, patient_id)
        if draft is None:
            raise N.InputProblem("this patient has no draft: run Analyze first")
        return draft

    def get_draft(self, user: str, patient_id: int) -> dict[str, Any] | None:
        return N.with_ids(self.store.get_draft(user, patient_id))

    def _change_draft(self, user: str, patient_id: int, change) -> dict[str, Any]:
        """Apply ``change`` to the stored draft atomically (a concurrent change is never lost)."""
        def apply(current):
            if current is None:
                raise N.InputProblem("this patient has no draft: run Analyze first")
            return change(N.with_ids(current))
        return self.store.update_draft(user, patient_id, apply)

    def edit_item(self, user: str, patient_id: int, ref: str, text: str | None, comment: str | None) -> dict:
        lim = self.a.max_input_chars
        text = None if text is None else N.check_text("Item text", text, lim, required=False)
        comment = None if comment is None else N.check_text("Comment", comment, lim, required=False)
        return self._change_draft(user, patient_id, lambda d: N.set_item(d, ref, text, comment))

    def add_item(self, user: str, patient_id: int, kind: str, text: str, comment: str = "") -> tuple[dict, str]:
        lim = self.a.max_input_chars
        text = N.check_text("Item text", text, lim)
        comment = N.check_text("Comment", comment, lim, required=False)
        refs: list[str] = []

        def apply(current):
            draft = N.with_ids(current) or N.new_draft(
                "", {"symptom_type": "", "reasons": [], "advice": [], "raw": "", "ok": True, "problem": ""})
            key = "reasons" if kind == "reason" else "advice"
            if len(draft.get(key, [])) >= self.a.max_note_items:
                raise N.InputProblem(f"the draft already has {len(draft[key])} {key} items (limit "
                                     f"{self.a.max_note_items}, setting app.max_note_items)")
            draft, ref = N.add_item(draft, kind, text, comment)
            refs.append(ref)
            return draft

        return self.store.update_draft(user, patient_id, apply), refs[-1]

    def delete_item(self, user: str, patient_id: int, ref: str) -> dict:
        return self._change_draft(user, patient_id, lambda d: N.delete_item(d, ref))

    def use_alternative(self, user: str, patient_id: int) -> dict:
        """Swap the draft with the analysis waiting beside it (the draft then waits in its place)."""
        return self._change_draft(user, patient_id, N.swap_alternative)

    def dismiss_alternative(self, user: str, patient_id: int) -> dict:
        """Drop the analysis waiting beside the draft (the most recent one, if several wait)."""
        return self._change_draft(user, patient_id, N.drop_alternative)

    def discard_draft(self, user: str, patient_id: int) -> None:
        self.store.save_draft(user, patient_id, None)

    def save_draft_as_note(self, user: str, patient_id: int) -> int:
        def note(current):
            if current is None:
                raise N.InputProblem("this patient has no draft: run Analyze first")
            return N.draft_to_note(current, user)
        return self.store.commit_draft(user, patient_id, note)

    # --- training ------------------------------------------------------------------------
    def training_records(self, user: str, patient_id: int, tokenizer) -> list[dict[str, str]]:
        """prompt/completion pairs: the patient's words -> the counselor's saved (edited) note."""
        patient = self.store.get_patient(user, patient_id)
        records = []
        for note in self.store.list_notes(user, patient_id):
            said = note["question"][: self.a.max_note_chars]
            prompt, _ = build_prompt(tokenizer, SYSTEM, analysis_task(said), patient, [], 0, 10**6, ANALYSIS_PREFIX)
            answer = N.note_text(note)[len(ANALYSIS_PREFIX):][: self.a.max_note_chars]
            records.append({"prompt": prompt, "completion": answer})
        return records

    def start_training(self, user: str, patient_id: int):
        from phyassist.models.loading import load_tokenizer

        pid = int(self.store.get_patient(user, patient_id)["id"])
        if self.store.adapter_for(pid) is None and self.store.adapter_count() >= self.a.max_adapters:
            raise AdapterLimit(f"adapter limit reached ({self.a.max_adapters}, setting app.max_adapters)")
        tokenizer = self.train_tokenizer or load_tokenizer(self.cfg.model, padding_side="right")
        records = self.training_records(user, pid, tokenizer)
        if len(records) < self.a.min_train_notes:
            raise AdapterLimit(f"patient #{pid} has {len(records)} saved note(s); training needs at least "
                               f"{self.a.min_train_notes} (setting app.min_train_notes)")
        self.store.audit(user, "start_training", f"patient:{pid}")
        return self.trainer.submit(TrainJob(pid, user, records))

    def _job_base(self, patient_id: int):
        """(model, run config) for one job: a copy of the resident base (no disk read, no second
        copy of the weights), an injected ``train_base``'s model, or None (the trainer loads one)."""
        cfg = patient_training_config(self.cfg, patient_id)
        if self.train_base is not None:
            return self.train_base(cfg), cfg
        if self.training_base is None:
            return None, cfg
        model = self.training_base.fresh(full_precision=not cfg.model.quant.load_in_4bit)
        return model, patient_training_config(self.cfg, patient_id, load_in_4bit=is_4bit(model))

    def _run_training(self, job: TrainJob) -> str:
        t0 = time.perf_counter()
        model, cfg = self._job_base(job.patient_id)
        job.status.base_s = time.perf_counter() - t0
        try:
            train_patient_adapter(cfg, job, self.store, model=model, tokenizer=self.train_tokenizer)
        finally:
            del model
            gc.collect()  # the job's LoRA, optimizer state and own tensors go now, not at some later collection
        if self.bank is not None:
            self.bank.forget(job.patient_id)
        return f"patient adapter #{job.patient_id} on {len(job.records)} note(s)"

    def training_status(self, patient_id: int):
        return self.trainer.status(patient_id)

    def adapter_path(self, patient_id: int) -> Path:
        return adapter_folder(self.store.data_dir, patient_id)

    # --- chat ----------------------------------------------------------------------------
    def stream_chat(self, user: str, message: str, history: list[dict[str, str]],
                    patient_id: int | None = None, with_notes: bool = False) -> Iterator[str]:
        """Stream a reply; the open patient's notes join the context when asked."""
        g = self._require_model()
        message = N.check_text("Message", message, self.a.max_input_chars)
        turns = "\n".join(f"{m['role']}: {m['content']}" for m in history[-6:])
        task = (f"Conversation so far:\n{turns}\n\n" if turns else "") + f"Counselor: {message}"
        patient, notes = None, []
        if with_notes and patient_id is not None:
            patient = self.store.get_patient(user, patient_id)
            notes = self.store.list_notes(user, patient_id)
        budget = context_budget(g.max_positions, self.a.context_tokens, self.a.max_new_tokens)
        prompt, _ = build_prompt(g.tokenizer, CHAT_SYSTEM, task, patient, notes, self.a.context_notes, budget)
        pid = patient_id if with_notes else None
        self.store.add_chat(user, pid, "user", message)
        reply = ""
        for piece in g.stream(prompt, self.a.max_new_tokens, pid):
            reply += piece
            yield reply
        self.store.add_chat(user, pid, "assistant", reply)

    def close(self) -> None:
        self.store.close()
