"""Patient records and counseling notes: fields, the study's note format, parsing model text
into items, draft editing and import/export. Pure functions over plain dicts (what the store
encrypts), so the UI, tests and notebook share one definition.

A note: ``date``, ``question`` (what the patient brought), ``symptom_type``, ``reasons`` and
``advice`` (numbered lists), optionally ``raw`` (model text that did not parse) and ``author``.
A draft has the same shape with items as ``{"text", "comment"}`` dicts.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

PATIENT_FIELDS: list[tuple[str, str]] = [
    ("name", "Name"), ("age", "Age"), ("gender", "Gender"), ("occupation", "Occupation"),
    ("personal_history", "Personal history"), ("mental_state", "Mental state"),
    ("physical_condition", "Physical condition"), ("social_functioning", "Social functioning"),
]
FIELD_KEYS = [k for k, _ in PATIENT_FIELDS]
LIST_KINDS = ("reason", "advice")
NOTICE = ("Draft for a qualified professional to review, not a diagnosis. The model can be wrong; "
          "the counselor decides what enters the record.")


class InputProblem(ValueError):
    """Counselor input that cannot be used; the message says which field and why."""


class DraftChanged(InputProblem):
    """The stored draft changed under a running generation so that its result cannot be applied
    (the draft was saved, discarded or replaced, or the item was deleted or edited meanwhile)."""


def check_text(label: str, text: str | None, max_chars: int, required: bool = True) -> str:
    """Stripped text, or InputProblem for empty (when required) or oversized input."""
    t = (text or "").strip()
    if required and not t:
        raise InputProblem(f"{label} is empty")
    if len(t) > max_chars:
        raise InputProblem(f"{label} is too long: {len(t)} characters (limit {max_chars})")
    return t


def _scalar_text(label: str, value: Any) -> str:
    """A field's value as text: strings and numbers only (a list or object is refused, not flattened)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputProblem(f"{label} must be text, got {type(value).__name__}")
    return str(value)


def clean_patient_fields(values: dict[str, Any], max_chars: int) -> dict[str, str]:
    """Validated patient fields; the name is required, the rest optional."""
    unknown = set(values) - set(FIELD_KEYS) - {"id"}
    if unknown:
        raise InputProblem(f"unknown patient field(s): {', '.join(sorted(unknown))[:200]}")
    out = {k: check_text(label, _scalar_text(label, values.get(k)), max_chars, required=(k == "name"))
           for k, label in PATIENT_FIELDS}
    return out


# --- rendering: patient text is shown as typed, never as HTML or Markdown ---------------------------
_MD_INLINE = re.compile(r"([\\`*_\[\]!|~$])")
_MD_LINE_START = re.compile(r"^([ \t]*)(#|[-+=]|\d+(?=[.)]))", re.M)


def _escape_line_start(m: re.Match) -> str:
    lead, mark = m.group(1), m.group(2)
    return f"{lead}{mark}\\" if mark[0].isdigit() else f"{lead}\\{mark}"


def md_escape(text: Any) -> str:
    """``text`` for a Markdown component, shown exactly as typed: HTML characters become entities
    (no tag, form, image or style from a patient field, note or model output reaches the page),
    the inline Markdown punctuation (images, links, emphasis, code, tables) is backslash-escaped,
    and so is what would start a heading or list at a line's start; line breaks stay line breaks."""
    t = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    t = _MD_LINE_START.sub(_escape_line_start, _MD_INLINE.sub(r"\\\1", t.replace("\r\n", "\n")))
    return t.replace("\n", "  \n")


def patient_summary_markdown(p: dict[str, Any]) -> str:
    """The basic information block for the page (escaped); :func:`patient_summary` is the model's."""
    return "  \n".join(f"{label}: {md_escape(p[k])}" for k, label in PATIENT_FIELDS if p.get(k))


def patient_summary(p: dict[str, Any]) -> str:
    """Basic information block used as model context (and shown on the patient page)."""
    lines = [f"{label}: {p[k]}" for k, label in PATIENT_FIELDS if p.get(k)]
    return "\n".join(lines)


def patient_label(p: dict[str, Any]) -> str:
    extra = ", ".join(str(p[k]) for k in ("age", "gender") if p.get(k))
    return f"#{p['id']} {p['name']}" + (f" ({extra})" if extra else "")


# --- parsing model output ------------------------------------------------------------------
_HEAD = r"^\s*[#*_>\-\s]*{name}\b[*_\s]*(?P<colon>[:：])?[*_\s]*"
_SYMPTOM_RE = re.compile(_HEAD.format(name=r"symptom\s*type") + r"(?P<rest>.*)$", re.I | re.M)
_REASONS_RE = re.compile(_HEAD.format(name=r"(?:reasoning|reasons?|analysis)") + r"(?P<rest>.*)$", re.I | re.M)
_ADVICE_RE = re.compile(_HEAD.format(name=r"(?:advice|suggestions?|recommendations?)") + r"(?P<rest>.*)$",
                        re.I | re.M)
_ITEM_RE = re.compile(r"^\s*(?:\d+\s*[.)、:]|[-*•])\s*(?P<text>.+?)\s*$")


def _items(rest: str, block: str, inline: bool = False) -> list[str]:
    """Numbered or bulleted lines; an unnumbered line continues the previous item. With
    ``inline``, text after the heading's colon ("Reasons: lost the job") is the first item."""
    items: list[str] = []
    rest = rest.strip(" *_")
    if inline and rest and not _ITEM_RE.match(rest):
        items.append(rest)
        rest = ""
    for line in [rest, *block.splitlines()]:
        m = _ITEM_RE.match(line)
        if m:
            items.append(m.group("text").strip(" *_"))
        elif line.strip() and items:
            items[-1] = f"{items[-1]} {line.strip()}"
    return [i for i in items if i]


def parse_analysis(text: str) -> dict[str, Any]:
    """Split model text into symptom type, reasons and advice.

    Returns ``{"ok", "symptom_type", "reasons", "advice", "raw", "problem"}``; ``ok`` is False
    (with ``problem`` saying what was missing) when any section is absent, and the raw text is
    always kept so nothing the model wrote is lost."""
    raw = text.strip()
    out: dict[str, Any] = {"ok": False, "symptom_type": "", "reasons": [], "advice": [], "raw": raw,
                           "problem": ""}
    sym = _SYMPTOM_RE.search(raw)
    rea = _REASONS_RE.search(raw, sym.end() if sym else 0)
    adv = _ADVICE_RE.search(raw, rea.end() if rea else 0)
    if sym:
        out["symptom_type"] = sym.group("rest").strip(" *_.")
    if rea:
        out["reasons"] = _items(rea.group("rest"), raw[rea.end():adv.start() if adv else len(raw)],
                                bool(rea.group("colon")))
    if adv:
        out["advice"] = _items(adv.group("rest"), raw[adv.end():], bool(adv.group("colon")))
    missing = [name for name, ok in (("symptom type", out["symptom_type"]), ("numbered reasons", out["reasons"]),
                                     ("numbered advice", out["advice"])) if not ok]
    out["ok"] = not missing
    out["problem"] = "" if out["ok"] else "could not find " + ", ".join(missing)
    return out


def parse_item(text: str) -> str:
    """One regenerated item: the first non-empty line without numbering or a section heading."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(?:\d+\s*[.)、:]|[-*•])\s*", "", line).strip(" *_")
        line = re.sub(r"^(?:symptom\s*type|reason|advice)\s*\d*\s*[:：]\s*", "", line, flags=re.I).strip()
        if line:
            return line
    return ""


# --- drafts ----------------------------------------------------------------------------------
# A draft: {"draft_id", "question", "symptom_type": item, "reasons": [item], "advice": [item], "raw",
# "parse_ok", "parse_problem", "context_report", "created_at"} plus "version" (set by the store on
# every save). An item is {"id", "text", "comment"}; the id is stable while the item lives, so a
# change made while the model was writing can be told apart from the model's own result. A draft
# may carry "alternatives": whole drafts (without alternatives of their own) waiting beside it, e.g.
# an analysis that finished after the draft had been changed meanwhile; the last one is offered.
def new_id() -> str:
    return secrets.token_hex(4)


def _item(text: str, comment: str = "") -> dict[str, str]:
    return {"id": new_id(), "text": text, "comment": comment}


def new_draft(question: str, parsed: dict[str, Any], context_report: str = "") -> dict[str, Any]:
    return {"draft_id": secrets.token_hex(8), "question": question, "symptom_type": _item(parsed["symptom_type"]),
            "reasons": [_item(t) for t in parsed["reasons"]],
            "advice": [_item(t) for t in parsed["advice"]],
            "raw": parsed["raw"], "parse_ok": parsed["ok"], "parse_problem": parsed["problem"],
            "context_report": context_report,
            "created_at": dt.datetime.now().isoformat(timespec="seconds")}


def with_ids(draft: dict[str, Any] | None) -> dict[str, Any] | None:
    """Copy of a draft where every item has an id. Drafts stored before ids existed get ids from
    their positions, the same on every read until the draft is saved with them."""
    if draft is None:
        return None
    d = json.loads(json.dumps(draft))
    d.setdefault("draft_id", "legacy")
    d["symptom_type"].setdefault("id", "s")
    for key in ("reasons", "advice"):
        for i, item in enumerate(d[key]):
            item.setdefault("id", f"{key[0]}{i}")
    return d


def item_refs(draft: dict[str, Any] | None) -> list[str]:
    """Names of the draft's items for a picker: 'symptom type', 'reason 1', 'advice 2', ..."""
    if not draft:
        return []
    return (["symptom type"] + [f"reason {i}" for i in range(1, len(draft["reasons"]) + 1)]
            + [f"advice {i}" for i in range(1, len(draft["advice"]) + 1)])


def _locate(draft: dict[str, Any], ref: str) -> tuple[str, int | None]:
    ref = (ref or "").strip().lower()
    if ref == "symptom type":
        return "symptom_type", None
    m = re.fullmatch(r"(reason|advice)\s+(\d+)", ref)
    if not m:
        raise InputProblem(f"pick an item of the draft (got {ref or 'nothing'!r})")
    key = "reasons" if m.group(1) == "reason" else "advice"
    idx = int(m.group(2)) - 1
    if not 0 <= idx < len(draft[key]):
        raise InputProblem(f"the draft has no {ref}")
    return key, idx


def get_item(draft: dict[str, Any], ref: str) -> dict[str, str]:
    key, idx = _locate(draft, ref)
    return draft[key] if idx is None else draft[key][idx]


def ref_of(draft: dict[str, Any] | None, item_id: str) -> str | None:
    """The current ref ('reason 2') of the item with ``item_id``, or None if it is gone."""
    if not draft:
        return None
    if draft["symptom_type"].get("id") == item_id:
        return "symptom type"
    for key, kind in (("reasons", "reason"), ("advice", "advice")):
        for i, item in enumerate(draft[key], 1):
            if item.get("id") == item_id:
                return f"{kind} {i}"
    return None


def set_item(draft: dict[str, Any], ref: str, text: str | None = None, comment: str | None = None) -> dict:
    """Copy of the draft with the item's text and/or comment replaced."""
    d = json.loads(json.dumps(draft))
    item = get_item(d, ref)
    if text is not None:
        item["text"] = text
    if comment is not None:
        item["comment"] = comment
    return d


def add_item(draft: dict[str, Any], kind: str, text: str, comment: str = "") -> tuple[dict, str]:
    """Copy of the draft with a new reason/advice appended; returns it and the new item's ref."""
    if kind not in LIST_KINDS:
        raise InputProblem(f"items can be added as {' or '.join(LIST_KINDS)}, not {kind!r}")
    d = json.loads(json.dumps(draft))
    key = "reasons" if kind == "reason" else "advice"
    d[key].append(_item(text, comment))
    return d, f"{kind} {len(d[key])}"


def delete_item(draft: dict[str, Any], ref: str) -> dict:
    d = json.loads(json.dumps(draft))
    key, idx = _locate(d, ref)
    if idx is None:
        d[key] = {"id": d[key].get("id") or new_id(), "text": "", "comment": ""}
    else:
        del d[key][idx]
    return d


def _content(item: dict[str, Any]) -> tuple[str, str]:
    return item.get("text", ""), item.get("comment", "")


def changed_items(base: dict[str, Any], latest: dict[str, Any]) -> set[str]:
    """Ids of the items of ``latest`` that are new or edited (text or comment) since ``base``."""
    before = {it["id"]: _content(it) for it in [base["symptom_type"], *base["reasons"], *base["advice"]]}
    return {it["id"] for it in [latest["symptom_type"], *latest["reasons"], *latest["advice"]]
            if before.get(it["id"]) != _content(it)}


def draft_stamp(draft: dict[str, Any] | None) -> tuple[str | None, int | None] | None:
    """Which stored draft this is and which save of it: equal stamps mean no change in between
    (the store raises ``version`` on every save; a new draft has a new ``draft_id``)."""
    return None if draft is None else (draft.get("draft_id"), draft.get("version"))


def _bare(draft: dict[str, Any]) -> dict[str, Any]:
    """A draft as an alternative: without its version and alternatives."""
    return {k: json.loads(json.dumps(v)) for k, v in draft.items() if k not in ("version", "alternatives")}


def add_alternative(draft: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``draft`` with ``other`` waiting beside it (offered first)."""
    d = json.loads(json.dumps(draft))
    d["alternatives"] = [*d.get("alternatives", []), _bare(other)]
    return d


def keep_alternatives(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """``new`` carrying the alternatives waiting beside ``old`` (a rewrite must not drop them)."""
    waiting = (old or {}).get("alternatives")
    return dict(new, alternatives=json.loads(json.dumps(waiting))) if waiting else new


def _waiting(draft: dict[str, Any]) -> list[dict[str, Any]]:
    waiting = draft.get("alternatives") or []
    if not waiting:
        raise InputProblem("no other analysis is waiting beside this draft")
    return waiting


def swap_alternative(draft: dict[str, Any]) -> dict[str, Any]:
    """The waiting analysis becomes the draft; the draft waits in its place (swap back at will)."""
    waiting = _waiting(draft)
    return dict(json.loads(json.dumps(waiting[-1])), alternatives=[_bare(w) for w in waiting[:-1]] + [_bare(draft)])


def drop_alternative(draft: dict[str, Any]) -> dict[str, Any]:
    """Copy of the draft without the waiting analysis offered (the last one)."""
    waiting = _waiting(draft)
    d = json.loads(json.dumps(draft))
    d["alternatives"] = waiting[:-1]
    return d


def merge_regenerated(base: dict[str, Any], latest: dict[str, Any], new: dict[str, Any]) -> tuple[dict, list[str]]:
    """The regenerated draft ``new`` (written from ``base``) merged with ``latest``, the stored draft
    once the model finished. Items the counselor edited or added after the regeneration started
    are kept: an edited symptom type replaces the model's, edited or added reasons and advice are
    appended after the model's. Items deleted meanwhile stay deleted (the model's list replaces the
    old one). Returns the merged draft and the refs, in it, of the kept items."""
    touched = changed_items(base, latest)
    out = json.loads(json.dumps(new))
    out["draft_id"] = latest.get("draft_id", out.get("draft_id"))
    kept: list[str] = []
    sym = latest["symptom_type"]
    if sym["id"] in touched and sym["text"].strip():
        out["symptom_type"] = json.loads(json.dumps(sym))
        kept.append("symptom type")
    for key, kind in (("reasons", "reason"), ("advice", "advice")):
        for item in latest[key]:
            if item["id"] in touched:
                out[key].append(json.loads(json.dumps(item)))
                kept.append(f"{kind} {len(out[key])}")
    return out, kept


def draft_to_note(draft: dict[str, Any], author: str, date: str | None = None) -> dict[str, Any]:
    """The note saved from a draft: item texts (comments are working notes, not the record)."""
    reasons = [i["text"].strip() for i in draft["reasons"] if i["text"].strip()]
    advice = [i["text"].strip() for i in draft["advice"] if i["text"].strip()]
    symptom = draft["symptom_type"]["text"].strip()
    if not (symptom or reasons or advice):
        raise InputProblem("the draft is empty: add a symptom type, a reason or an advice item before saving")
    note = {"date": date or dt.date.today().isoformat(), "question": draft["question"],
            "symptom_type": symptom, "reasons": reasons, "advice": advice, "author": author}
    if not draft.get("parse_ok", True):
        note["raw"] = draft.get("raw", "")
    return note


def draft_markdown(draft: dict[str, Any] | None) -> str:
    if not draft:
        return "_No draft. Enter what the patient said and press **Analyze**._"

    def line(ref: str, item: dict) -> str:
        c = f"  \n  _comment: {md_escape(item['comment'])}_" if item.get("comment") else ""
        return f"- **{ref}**: {md_escape(item['text']) if item['text'] else '_(empty)_'}{c}"

    out = [f"> ⚠️ {NOTICE}", "", f"**Counseling question:** {md_escape(draft['question'])}", ""]
    out.append(line("symptom type", draft["symptom_type"]))
    out += [line(f"reason {i}", it) for i, it in enumerate(draft["reasons"], 1)]
    out += [line(f"advice {i}", it) for i, it in enumerate(draft["advice"], 1)]
    if not draft.get("parse_ok", True):
        out += ["", f"**The model's text could not be split into items** ({md_escape(draft.get('parse_problem', ''))}); "
                "it is kept below. Add or edit items by hand, or regenerate.", "", md_escape(draft["raw"])]
    if draft.get("context_report"):
        out += ["", f"_Context: {md_escape(draft['context_report'])}_"]
    if draft.get("alternatives"):
        out += ["", alternative_markdown(draft["alternatives"])]
    return "\n".join(out)


ALTERNATIVE_HEADING = "Another analysis is waiting beside this draft"


def alternative_markdown(waiting: list[dict[str, Any]]) -> str:
    """The analysis offered beside the draft, in full, to compare before using or dismissing it."""
    alt = with_ids(waiting[-1])
    more = f" ({len(waiting) - 1} more after it)" if len(waiting) > 1 else ""
    out = [f"#### {ALTERNATIVE_HEADING}{more}",
           "_It was written while the draft above was being changed (in this or another session), so it "
           "did not replace it. **Use the other analysis** swaps the two; **Dismiss it** drops it._", "",
           f"**Counseling question:** {md_escape(alt['question'])}", "",
           f"- symptom type: {md_escape(alt['symptom_type']['text']) if alt['symptom_type']['text'] else '_(empty)_'}"]
    out += [f"- reason {i}: {md_escape(it['text'])}" for i, it in enumerate(alt["reasons"], 1)]
    out += [f"- advice {i}: {md_escape(it['text'])}" for i, it in enumerate(alt["advice"], 1)]
    if not alt.get("parse_ok", True):
        out += ["", md_escape(alt.get("raw", ""))]
    return "\n".join(out)


# --- the study's note format -----------------------------------------------------------------
def note_text(note: dict[str, Any]) -> str:
    """Plain-text note in the study's format (also the training answer for patient adapters)."""
    lines = [f"Symptom type: {note['symptom_type'] or '-'}", "Reasons:"]
    lines += [f"{i}. {r}" for i, r in enumerate(note["reasons"], 1)] or ["-"]
    lines.append("Advice:")
    lines += [f"{i}. {a}" for i, a in enumerate(note["advice"], 1)] or ["-"]
    return "\n".join(lines)


def note_markdown(note: dict[str, Any], number: int | None = None) -> str:
    """A note for display (and the Markdown export): the format's structure in Markdown, every
    text in it escaped (:func:`md_escape`)."""
    head = f"### {md_escape(note['date'])}" + (f" · note {number}" if number else "")
    out = [head, "", f"**Counseling question:** {md_escape(note['question'])}", "", "**Analysis**", "",
           f"*Symptom type:* {md_escape(note['symptom_type']) if note['symptom_type'] else '-'}", "", "*Reasons:*", ""]
    out += [f"{i}. {md_escape(r)}" for i, r in enumerate(note["reasons"], 1)] or ["-"]
    out += ["", "**Advice**", ""]
    out += [f"{i}. {md_escape(a)}" for i, a in enumerate(note["advice"], 1)] or ["-"]
    if note.get("raw"):
        out += ["", "*Unparsed model text:*", "", md_escape(note["raw"])]
    return "\n".join(out)


def export_markdown(patient: dict[str, Any], notes: list[dict[str, Any]]) -> str:
    out = [f"# {md_escape(patient['name'])}", "", "_Confidential patient record exported from PhyAssist._", ""]
    out += [f"- **{label}:** {md_escape(patient[k])}" for k, label in PATIENT_FIELDS[1:] if patient.get(k)]
    out += ["", "## Notes", ""]
    out += [note_markdown(n, i) + "\n" for i, n in enumerate(notes, 1)] or ["_No notes yet._"]
    return "\n".join(out).rstrip() + "\n"


# --- import / export (JSON) ------------------------------------------------------------------
def export_json(patient: dict[str, Any], notes: list[dict[str, Any]]) -> str:
    p = {k: patient.get(k, "") for k in FIELD_KEYS}
    ns = [{k: n.get(k) for k in ("date", "question", "symptom_type", "reasons", "advice")} for n in notes]
    return json.dumps({"format": "phyassist-patient-v1", "patient": p, "notes": ns}, ensure_ascii=False, indent=2)


@dataclass(frozen=True)
class ImportLimits:
    """What one imported patient file may hold: the UI's own limits (``max_chars`` per text,
    ``max_items`` reasons or advice per note) plus the number of notes and the JSON nesting."""

    max_chars: int
    max_notes: int = 500
    max_items: int = 50
    max_depth: int = 8


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
NOTE_KEYS = ("date", "question", "symptom_type", "reasons", "advice")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text`` (brackets inside strings do not count);
    checked before parsing, so a deeply nested file gets a clear message, not a recursion error."""
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", _JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _text_list(where: str, value: Any, limits: ImportLimits) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InputProblem(f"{where}: expected a list of strings")
    if len(value) > limits.max_items:
        raise InputProblem(f"{where}: {len(value)} items (limit {limits.max_items}, setting app.max_note_items)")
    return [check_text(f"{where}[{i}]", x, limits.max_chars, required=False) for i, x in enumerate(value, 1)]


def parse_import(text: str, limits: ImportLimits | int) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Validate an exported patient file completely, against the UI's limits, before anything is
    written. ``limits``: :class:`ImportLimits`, or the longest text alone."""
    if isinstance(limits, int):
        limits = ImportLimits(max_chars=limits)
    depth = json_depth(text)
    if depth > limits.max_depth:
        raise InputProblem(f"import file: arrays/objects nest {depth} deep (limit {limits.max_depth}; a patient "
                           "export nests 3 deep)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputProblem(f"import file is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise InputProblem(f"import file: arrays/objects nest too deeply (limit {limits.max_depth})") from None
    if not isinstance(data, dict) or data.get("format") != "phyassist-patient-v1":
        raise InputProblem("import file: expected {\"format\": \"phyassist-patient-v1\", \"patient\", \"notes\"}")
    if not isinstance(data.get("patient"), dict):
        raise InputProblem("import file: 'patient' must be an object of patient fields")
    fields = clean_patient_fields(data["patient"], limits.max_chars)
    notes = data.get("notes", [])
    if not isinstance(notes, list):
        raise InputProblem("import file: 'notes' must be a list")
    if len(notes) > limits.max_notes:
        raise InputProblem(f"import file: {len(notes)} notes (limit {limits.max_notes}, setting app.max_import_notes)")
    clean = []
    for i, n in enumerate(notes, 1):
        where = f"import file: notes[{i}]"
        if not isinstance(n, dict):
            raise InputProblem(f"{where} is not an object")
        unknown = sorted(set(n) - set(NOTE_KEYS))
        if unknown:
            raise InputProblem(f"{where}: unknown key(s) {', '.join(unknown)[:200]} (expected {', '.join(NOTE_KEYS)})")
        try:
            dt.date.fromisoformat(str(n.get("date")))
        except ValueError:
            raise InputProblem(f"{where}.date: expected YYYY-MM-DD, got {str(n.get('date'))[:40]!r}") from None
        clean.append({"date": str(n["date"]),
                      "question": check_text(f"{where}.question", _scalar_text(f"{where}.question", n.get("question")),
                                             limits.max_chars),
                      "symptom_type": check_text(f"{where}.symptom_type",
                                                 _scalar_text(f"{where}.symptom_type", n.get("symptom_type")),
                                                 limits.max_chars, False),
                      "reasons": _text_list(f"{where}.reasons", n.get("reasons", []), limits),
                      "advice": _text_list(f"{where}.advice", n.get("advice", []), limits)})
    return fields, clean
