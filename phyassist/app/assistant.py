"""Prompts and streamed generation for the counselor assistant.

Prompts carry the patient's basic information and recent notes as far as the model's context
allows; what did not fit is reported, never dropped silently. Generation streams through
``TextIteratorStreamer`` on one model shared by all sessions under a lock (the Gradio queue
decides who waits), and stops early when the browser goes away.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from phyassist.app.notes import note_text, patient_summary

SYSTEM = ("You assist a licensed psychological counselor; you never talk to the patient. From what the "
          "patient said today, draft a short analysis for the counselor in this format:\n"
          "Symptom type: <a short phrase>\nReasons:\n1. <a reason drawn from what the patient said>\n"
          "2. <another reason>\nAdvice:\n1. <advice the counselor could give>\n2. <more advice>")
CHAT_SYSTEM = ("You assist a licensed psychological counselor with professional questions. Be concise and "
               "careful; you are not talking to a patient.")
ANALYSIS_PREFIX = "Symptom type:"


@dataclass
class ContextReport:
    """What the prompt contains and what was left out to fit the model's context."""

    budget_tokens: int
    prompt_tokens: int = 0
    notes_total: int = 0
    notes_used: int = 0
    info_included: bool = True
    omitted: list[str] = field(default_factory=list)

    def text(self) -> str:
        used = (f"basic information{'' if self.info_included else ' (left out)'}; "
                f"{self.notes_used} of {self.notes_total} earlier note(s)")
        out = f"{used}; prompt {self.prompt_tokens} of {self.budget_tokens} tokens"
        if self.omitted:
            out += ". Left out to fit the context: " + "; ".join(self.omitted)
        return out


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer, system: str, user: str, prefix: str = "") -> str:
    """The chat-formatted prompt with the assistant's answer started by ``prefix``."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix


def _note_block(note: dict[str, Any]) -> str:
    return f"[{note['date']}] Patient said: {note['question']}\n{note_text(note)}"


def context_budget(model_max_positions: int, context_tokens: int, max_new_tokens: int) -> int:
    """Prompt tokens available: the smaller of the model's and the configured context, less the answer."""
    return max(64, min(model_max_positions, context_tokens) - max_new_tokens)


def build_prompt(tokenizer, system: str, task: str, patient: dict | None, notes: list[dict],
                 max_recent: int, budget: int, prefix: str = "") -> tuple[str, ContextReport]:
    """Fit ``task`` first, then the basic information, then notes newest first, within ``budget``."""
    report = ContextReport(budget_tokens=budget, notes_total=len(notes))
    recent = notes[-max_recent:] if max_recent else []
    if len(notes) > len(recent):
        report.omitted.append(f"{len(notes) - len(recent)} older note(s) beyond the {max_recent} most recent")

    def assemble(info: str, blocks: list[str]) -> str:
        parts = []
        if info:
            parts.append(f"Patient information:\n{info}")
        if blocks:
            parts.append("Earlier notes (oldest first):\n" + "\n\n".join(blocks))
        parts.append(task)
        return render(tokenizer, system, "\n\n".join(parts), prefix)

    info = patient_summary(patient) if patient else ""
    if info and count_tokens(tokenizer, assemble(info, [])) > budget:
        report.info_included = False
        report.omitted.append("basic information")
        info = ""
    chosen: list[str] = []
    for i, note in enumerate(reversed(recent)):
        trial = [_note_block(note)] + chosen
        if count_tokens(tokenizer, assemble(info, trial)) > budget:
            report.omitted.append(f"{len(recent) - i} more earlier note(s)")
            break
        chosen = trial
    report.info_included = bool(info) or not patient
    report.notes_used = len(chosen)
    prompt = assemble(info, chosen)
    report.prompt_tokens = count_tokens(tokenizer, prompt)
    if report.prompt_tokens > budget + max(64, budget // 4):
        raise ValueError(f"the text alone needs {report.prompt_tokens} tokens, more than the model's "
                         f"context allows ({budget}); shorten it")
    return prompt, report


def analysis_task(said: str) -> str:
    return f"What the patient said today:\n\"\"\"{said}\"\"\"\n\nDraft the analysis and advice."


def draft_feedback(draft: dict[str, Any]) -> str:
    """The counselor's current draft, edits and comments, as text the model can take into account."""
    def row(label, item):
        c = f" (counselor's comment: {item['comment']})" if item.get("comment") else ""
        return f"{label}: {item['text'] or '(empty)'}{c}"

    lines = [row("Symptom type", draft["symptom_type"])]
    lines += [row(f"Reason {i}", it) for i, it in enumerate(draft["reasons"], 1)]
    lines += [row(f"Advice {i}", it) for i, it in enumerate(draft["advice"], 1)]
    return "\n".join(lines)


def regenerate_all_task(draft: dict[str, Any]) -> str:
    return (analysis_task(draft["question"]) + "\n\nThe counselor reviewed an earlier draft, edited it and "
            "commented. Keep the counselor's edits, follow the comments, and write the improved draft:\n"
            + draft_feedback(draft))


def item_prefix(ref: str) -> str:
    """Start of the answer for one item, so even a small model answers with the item itself."""
    return "Symptom type:" if ref == "symptom type" else f"{ref.capitalize()}:"


def regenerate_item_task(draft: dict[str, Any], ref: str) -> str:
    kind = "the symptom type (one phrase)" if ref == "symptom type" else f"{ref} (one sentence)"
    return (analysis_task(draft["question"]) + "\n\nCurrent draft, edited and commented by the counselor:\n"
            + draft_feedback(draft) + f"\n\nRewrite only {kind}, following the counselor's comment on it. "
            "Reply with the new text only.")


def chat_task(message: str) -> str:
    return message


class NoteFormatGuard:
    """A logits processor that keeps an analysis in the note format the app parses: the symptom
    type on one line, then ``Reasons:`` with numbered items, then ``Advice:`` with numbered items.

    The model writes every line's content freely; the guard acts only where a line ends. It then
    writes the next line's start itself: the next number while the model wants another item (its
    most likely next token is a digit or a bullet) and the section has fewer than ``max_items``,
    else the next section's heading, and after the advice the end of the text. It also keeps lines
    from being empty or endless (``symptom_tokens``, ``item_tokens``), keeps the end of the text
    from coming before any advice, and leaves room for the advice within ``max_new_tokens``.
    Small models (the embedded 135 M default) rarely keep the format unaided; for a model that
    does, the guard writes what it would have written. Batch size 1.
    """

    def __init__(self, tokenizer, prompt_len: int, max_new_tokens: int, newline_ids: list[int],
                 eos_id: int, min_items: int = 2, max_items: int = 4, item_tokens: int = 72):
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.max_new = max_new_tokens
        self.newline_ids = newline_ids
        self.eos_id = eos_id
        self.min_items, self.max_items, self.item_tokens = min_items, max_items, item_tokens
        self.symptom_tokens = max(4, min(16, max_new_tokens // 6))
        self.reserve = max(6, min(48, max_new_tokens // 4))  # tokens kept for the advice
        self.section, self.items, self.line_len = "symptom", 0, 0
        self.queue: list[int] = []
        self.line_start = self.forced_last = self.ends_line = False

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _wants_item(self, scores) -> bool:
        top = self.tok.decode([int(scores[0].argmax())]).lstrip()
        return top[:1].isdigit() or top[:1] in ("-", "*", "\u2022")

    def _observe(self, input_ids) -> None:
        """Update the line state from the token the model chose last step."""
        if input_ids.shape[1] <= self.prompt_len or self.forced_last:
            return
        piece = self.tok.decode(input_ids[0, -1:], skip_special_tokens=True)
        if "\n" in piece and not piece.rsplit("\n", 1)[1].strip():
            self.line_start = True
        elif piece.strip():  # blanks and special tokens do not make a line non-empty
            self.line_len += 1

    def _plan(self, remaining: int, scores) -> None:
        """Queue the tokens to write now, if any."""
        if self.section == "done":
            self.queue = [self.eos_id]
            return
        if self.line_start:
            self.line_start = False
            more = self.items < self.min_items or (self.items < self.max_items and self._wants_item(scores))
            if self.section == "symptom":
                self.section, self.items, text = "reasons", 1, "Reasons:\n1."
            elif self.section == "reasons" and more and remaining > self.reserve + 8:
                self.items += 1
                text = f"{self.items}."
            elif self.section == "reasons":
                self.section, self.items, text = "advice", 1, "Advice:\n1."
            elif more and remaining > 8:
                self.items += 1
                text = f"{self.items}."
            else:
                self.section, self.queue = "done", [self.eos_id]
                return
            self.queue = self._encode(text)
            return
        cap = self.symptom_tokens if self.section == "symptom" else self.item_tokens
        low = self.section != "advice" and remaining <= self.reserve
        if self.line_len > 0 and (self.line_len >= cap or low):
            self.queue = self._encode("\n")
            self.ends_line = True

    def __call__(self, input_ids, scores):
        self._observe(input_ids)
        self.forced_last = False
        if not self.queue:
            self._plan(self.max_new - (input_ids.shape[1] - self.prompt_len), scores)
        if self.queue:
            token = self.queue.pop(0)
            self.forced_last = True
            if not self.queue:  # written: a line start (the model writes its content) or a line end
                self.line_len, self.line_start, self.ends_line = 0, self.ends_line, False
            out = scores.new_full(scores.shape, float("-inf"))
            out[:, token] = 0.0
            return out
        scores = scores.clone()
        if self.line_len == 0:  # no empty line
            scores[:, self.newline_ids] = float("-inf")
        if not (self.section == "advice" and self.line_len > 0):  # no end before an advice item
            scores[:, self.eos_id] = float("-inf")
        return scores


class StopFlag:
    """A stopping criterion set from another thread (browser closed, session ended)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


class Generator:
    """One loaded model serving every session; ``stream`` yields text pieces as they decode."""

    def __init__(self, model, tokenizer, *, repetition_penalty: float = 1.1,
                 activate: Callable[[int | None], str] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.repetition_penalty = repetition_penalty
        self.activate = activate or (lambda patient_id: "base model")
        self.lock = threading.Lock()
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.newline_ids = [i for i, t in enumerate(texts) if "\n" in t]  # for NoteFormatGuard
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        self.eos_id = eos if isinstance(eos, int) else tokenizer.eos_token_id

    @property
    def max_positions(self) -> int:
        cfg = getattr(self.model, "config", None)
        return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)

    def stream(self, prompt: str, max_new_tokens: int, patient_id: int | None = None,
               guided: bool = False) -> Iterator[str]:
        """Yield decoded text pieces; the model's adapter is chosen for ``patient_id`` first.
        ``guided``: keep an analysis in the note format (:class:`NoteFormatGuard`)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList, TextIteratorStreamer

        from phyassist.models.generation import generate

        stop = StopFlag()
        with self.lock:
            self.activate(patient_id)
            inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            device = getattr(self.model, "device", None)
            if device is not None:
                inputs = inputs.to(device)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                            timeout=600)
            errors: list[BaseException] = []
            guards = LogitsProcessorList()
            if guided:
                guards.append(NoteFormatGuard(self.tokenizer, inputs["input_ids"].shape[1], max_new_tokens,
                                              self.newline_ids, self.eos_id))

            def run():
                try:
                    with torch.inference_mode():
                        generate(self.model, **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                            repetition_penalty=self.repetition_penalty, streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([stop]),
                                            logits_processor=guards,
                                            pad_token_id=self.tokenizer.pad_token_id)
                except BaseException as exc:  # re-raised in the caller's thread
                    errors.append(exc)
                    streamer.end()

            worker = threading.Thread(target=run, name="phyassist-generate", daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                stop.event.set()
                worker.join()
            if errors:
                raise errors[0]

    def complete(self, prompt: str, max_new_tokens: int, patient_id: int | None = None,
                 guided: bool = False) -> str:
        return "".join(self.stream(prompt, max_new_tokens, patient_id, guided))
