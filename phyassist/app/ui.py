"""The Gradio UI of the counselor assistant: Patients, Notes, Analysis + Draft, Train, Chat, Audit.

Every handler resolves the logged-in counselor from the request (for the audit log), catches
input problems into the status line (nothing changed), and streams model output. The open
patient's id lives in the browser (``BrowserState``), so a page reload reopens the patient and
the stored draft.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from starlette.middleware import Middleware

from phyassist.app import notes as N
from phyassist.app.adapters import AdapterLimit
from phyassist.app.crypto import KeyProblem
from phyassist.app.private import close_workdir, open_workdir
from phyassist.app.service import CounselorService
from phyassist.app.storage import UnknownPatient
from phyassist.app.web import CLIENT_ADDRESS, ExportDesk, GuardMiddleware, LoginThrottle

log = logging.getLogger(__name__)
EXPECTED = (N.InputProblem, UnknownPatient, AdapterLimit, KeyProblem)
LOCAL_USER = "local"
NO_PATIENT = "_No patient open: search on the **Patients** tab and open one._"


def _user(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or LOCAL_USER) if request is not None else LOCAL_USER


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _status(text: str, ok: bool = True) -> str:
    """The status line; its text may quote patient input (an error naming a field's value), so it
    is escaped like all patient text."""
    return f"{'✔' if ok else '⚠'} {N.md_escape(text)}"


def _pid(value) -> int:
    """The patient id sent by the browser: a whole number (``1.9``, ``True``, ``"1x"`` are refused,
    never read as patient 1)."""
    if value in (None, ""):
        raise N.InputProblem("no patient open: open one on the Patients tab first")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise N.InputProblem(f"patient id must be a whole number, got {str(value)[:40]!r}")


def check_bind(host: str, users: dict[str, str], users_env: str = "PHYASSIST_APP_USERS") -> None:
    """Refuse a non-loopback address without logins (called before the model loads)."""
    if not users and host not in LOOPBACK:
        raise ValueError(f"refusing to serve on {host} without a login: set {users_env}='user:password' "
                         "or app.auth_file")


def load_users(a, environ=os.environ) -> dict[str, str]:
    """Logins from ``$users_env`` ('alice:pw,bob:pw2') and/or ``auth_file`` (user:password lines)."""
    users: dict[str, str] = {}
    lines = [x for x in environ.get(a.users_env, "").split(",") if x.strip()]
    if a.auth_file:
        path = Path(a.auth_file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: app.auth_file not found")
        lines += [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip() and not x.startswith("#")]
    for i, line in enumerate(lines, 1):
        name, sep, pw = line.strip().partition(":")
        if not sep or not name or not pw:
            raise ValueError(f"login {i}: expected 'user:password' (from {a.users_env} or app.auth_file)")
        users[name] = pw
    return users


def make_auth(users: dict[str, str], throttle: LoginThrottle | None = None,
              audit: Callable[[str, str, str], None] | None = None) -> Callable[[str, str], bool] | None:
    """The login check: throttled per user and address (``throttle``), every failure and refusal
    written to the audit log (``audit(user, action, target)``) under the login's name when it is a
    known one (else "(unknown user)": a mistyped password in the name field is not stored)."""
    if not users:
        return None
    throttle = throttle or LoginThrottle()

    def check(username: str, password: str) -> bool:
        address = CLIENT_ADDRESS.get()
        who = username if username in users else "(unknown user)"
        wait = throttle.wait_s(username, address)
        if wait > 0:
            if audit:
                audit(who, "login_throttled", f"address:{address}")
            return False
        expected = users.get(username)
        ok = expected is not None and hmac.compare_digest(expected.encode(), (password or "").encode())
        if ok:
            throttle.succeeded(username, address)
            if audit:
                audit(who, "login", f"address:{address}")
        else:
            throttle.failed(username, address)
            if audit:
                audit(who, "login_failed", f"address:{address}")
        return ok

    return check


def local_theme():
    """System fonts only: the page loads nothing from outside the machine (no web fonts)."""
    sans = [gr.themes.Font("ui-sans-serif"), gr.themes.Font("system-ui"), gr.themes.Font("sans-serif")]
    mono = [gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")]
    return gr.themes.Default(font=sans, font_mono=mono)


def _patient_choices(patients: list[dict]) -> list[tuple[str, int]]:
    return [(N.patient_label(p), p["id"]) for p in patients]


def _md(value: str = "", **kwargs) -> gr.Markdown:
    """A Markdown component for text that may hold patient text (escaped by the caller): HTML
    sanitized as a second line of defence, no LaTeX."""
    return gr.Markdown(value, sanitize_html=True, latex_delimiters=[], **kwargs)


def _textbox(**kwargs) -> gr.Textbox:
    """A text field the browser does not keep: with autocomplete off, chromium neither offers its
    text as a suggestion nor saves it in the session's form state (its Sessions files on disk)."""
    return gr.Textbox(html_attributes=gr.InputHTMLAttributes(autocomplete="off", spellcheck=False), **kwargs)


def _chat_view(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The chat as shown: every message escaped (the raw history stays on the server)."""
    return [{"role": m["role"], "content": N.md_escape(m["content"])} for m in history]


def remove_upload(path: Path) -> None:
    """Delete an uploaded file and Gradio's other copies of it in its upload folder (same size and
    bytes), read or rejected alike: an import's plaintext stays on disk no longer than its reading."""
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    path.unlink(missing_ok=True)
    root = Path(gr.utils.get_upload_folder())
    if data is None or not root.is_dir():
        return
    for other in root.rglob("*"):
        try:
            if other.is_file() and other.stat().st_size == len(data) and other.read_bytes() == data:
                other.unlink(missing_ok=True)
        except OSError:
            continue
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        try:
            folder.rmdir()  # empty hash folders
        except OSError:
            pass


def build_ui(svc: CounselorService, desk: ExportDesk | None = None) -> gr.Blocks:
    a = svc.a
    desk = desk if desk is not None else ExportDesk()  # (an empty desk is falsy: it has a length)

    def guarded(fn: Callable, n_out: int):
        """Run ``fn``; on an expected problem show it in the status line and change nothing else."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except EXPECTED as exc:
                return (gr.update(),) * (n_out - 1) + (_status(str(exc), ok=False),)
        return wrapper

    def guarded_stream(fn: Callable, n_out: int):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except EXPECTED as exc:
                yield (gr.update(),) * (n_out - 1) + (_status(str(exc), ok=False),)
        return wrapper

    def patient_view(user: str, pid: int):
        p = svc.store.get_patient(user, pid)
        notes, damaged = svc.store.list_notes_checked(user, pid)
        head = (f"## {N.md_escape(N.patient_label(p))}\n\n" + N.patient_summary_markdown(p)
                + f"\n\n_Model for this patient: {N.md_escape(svc.model_label(pid))}_")
        body = "\n\n".join(N.note_markdown(n, i) for i, n in enumerate(notes, 1)) or "_No notes yet._"
        if damaged:
            body = (f"⚠ **{len(damaged)} stored note(s) do not open** (ids {', '.join(map(str, damaged))}): changed, "
                    "or copied from another row or patient, outside the app. The other notes are shown.\n\n" + body)
        return head, body

    def draft_view(draft):
        refs = N.item_refs(draft)
        return N.draft_markdown(draft), gr.update(choices=refs, value=None)

    with gr.Blocks(title="PhyAssist counselor assistant", analytics_enabled=False) as demo:
        open_pid = gr.BrowserState(None, storage_key="phyassist_open_patient")
        _md("# PhyAssist · counselor assistant\n"
                    f"_For the counselor only; the model never talks to the patient. {N.NOTICE}_")
        patient_head = _md(NO_PATIENT, elem_id="patient-head")
        status = _md("", elem_id="status")
        chat_raw = gr.State([])  # the chat as typed and generated; the Chatbot shows it escaped
        with gr.Tabs():
            with gr.Tab("Patients", id="patients"):
                with gr.Row():
                    query = _textbox(label="Search patients", placeholder="name, age, any field",
                                       elem_id="search", scale=4)
                    search_btn = gr.Button("Search", elem_id="search-btn", scale=1)
                results = gr.Radio(label="Patients", choices=[], elem_id="results")
                open_btn = gr.Button("Open patient", variant="primary", elem_id="open-btn")
                with gr.Accordion("New patient", open=True):
                    field_boxes = {k: _textbox(label=label, elem_id=f"f-{k}",
                                                 lines=1 if k in ("name", "age", "gender", "occupation") else 2)
                                   for k, label in N.PATIENT_FIELDS}
                    create_btn = gr.Button("Create patient", variant="primary", elem_id="create-btn")
                with gr.Accordion("Import a patient (JSON export)", open=False):
                    import_file = gr.File(label="phyassist-patient-v1 JSON", file_types=[".json"],
                                          elem_id="import-file")
                    import_btn = gr.Button("Import", elem_id="import-btn")
            with gr.Tab("Notes", id="notes"):
                notes_md = _md("", elem_id="notes")
                with gr.Row():
                    export_md_btn = gr.Button("Export Markdown", elem_id="export-md")
                    export_json_btn = gr.Button("Export JSON", elem_id="export-json")
                export_link = _md("", elem_id="export-link")
            with gr.Tab("Analysis", id="analysis"):
                said = _textbox(label="What the patient said", lines=4, elem_id="said",
                                  max_length=a.max_input_chars)
                analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
                stream_box = _textbox(label="Model output (streaming)", lines=8, interactive=False,
                                        elem_id="stream")
                gr.Markdown(f"⚠️ **{N.NOTICE}**", elem_id="notice")
                gr.Markdown("### Draft")
                draft_md = _md(N.draft_markdown(None), elem_id="draft")
                item_pick = gr.Radio(label="Item", choices=[], elem_id="item-pick")
                item_text = _textbox(label="Item text", lines=2, elem_id="item-text")
                item_comment = _textbox(label="Comment for regeneration", lines=1, elem_id="item-comment")
                with gr.Row():
                    apply_btn = gr.Button("Apply edit", elem_id="apply-edit")
                    delete_btn = gr.Button("Delete item", elem_id="delete-item")
                    add_reason_btn = gr.Button("Add as reason", elem_id="add-reason")
                    add_advice_btn = gr.Button("Add as advice", elem_id="add-advice")
                with gr.Row():
                    regen_item_btn = gr.Button("Regenerate item", elem_id="regen-item")
                    regen_all_btn = gr.Button("Regenerate all", elem_id="regen-all")
                    save_btn = gr.Button("Save to notes", variant="primary", elem_id="save-note")
                    discard_btn = gr.Button("Discard draft", variant="stop", elem_id="discard")
                with gr.Row(visible=False, elem_id="alternative-row") as alt_row:  # shown with a waiting analysis
                    use_alt_btn = gr.Button("Use the other analysis", elem_id="use-alternative")
                    dismiss_alt_btn = gr.Button("Dismiss it", elem_id="dismiss-alternative")
            with gr.Tab("Train", id="train"):
                gr.Markdown("Train a LoRA adapter on this patient's saved notes (the counselor's edited "
                            f"notes are the answers). Limits: {a.max_adapters} adapters, notes cut at "
                            f"{a.max_note_chars} characters, {a.train_max_steps} steps. The adapter is "
                            "encrypted at rest and never published.")
                train_btn = gr.Button("Train patient adapter", variant="primary", elem_id="train-btn")
                train_md = _md("no training started", elem_id="train-status")
                timer = gr.Timer(1.0, active=False)
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(label="Chat with the model", elem_id="chatbot", height=360, sanitize_html=True,
                                     latex_delimiters=[], allow_tags=False)
                with gr.Row():
                    chat_in = _textbox(label="Message", elem_id="chat-in", scale=4)
                    use_notes = gr.Checkbox(label="Use the open patient's notes", value=False,
                                            elem_id="use-notes", scale=1)
                send_btn = gr.Button("Send", variant="primary", elem_id="send")
            with gr.Tab("Audit", id="audit"):
                with gr.Row():
                    audit_btn = gr.Button("Refresh audit log", elem_id="audit-btn")
                    verify_btn = gr.Button("Verify the log's MAC chain", elem_id="audit-verify")
                audit_df = gr.Dataframe(headers=["at", "user", "action", "target"], elem_id="audit",
                                        interactive=False)

        # --- patients --------------------------------------------------------------------
        def do_search(q, request: gr.Request):
            found = svc.search(_user(request), q)
            return gr.update(choices=_patient_choices(found), value=None), _status(f"{len(found)} patient(s)")

        def do_create(name, age, gender, occupation, personal_history, mental_state, physical_condition,
                      social_functioning, request: gr.Request):
            user = _user(request)
            vals = (name, age, gender, occupation, personal_history, mental_state, physical_condition,
                    social_functioning)
            pid = svc.create_patient(user, dict(zip(N.FIELD_KEYS, vals)))
            head, body = patient_view(user, pid)
            draft = svc.get_draft(user, pid)
            return (pid, head, body, *draft_view(draft), *[""] * len(N.FIELD_KEYS),
                    _status(f"Created and opened patient #{pid}"))

        def do_open(pid, request: gr.Request):
            user = _user(request)
            pid = _pid(pid)
            head, body = patient_view(user, pid)
            draft = svc.get_draft(user, pid)
            return (pid, head, body, *draft_view(draft), [], [],
                    _status(f"Opened patient #{pid}" + (" (stored draft restored)" if draft else "")))

        def do_reopen(pid, request: gr.Request):
            if pid in (None, ""):
                return (gr.update(),) * 8
            try:
                return do_open(pid, request)
            except (UnknownPatient, N.InputProblem):
                return None, NO_PATIENT, "", *draft_view(None), [], [], _status("The patient open before is gone", False)

        def do_import(file, request: gr.Request):
            """Imported or rejected, the upload is deleted and the file picker emptied."""
            if file is None:
                raise N.InputProblem("choose a JSON file to import")
            path = Path(file if isinstance(file, str) else file.name)
            try:
                text = path.read_text(encoding="utf-8")
                pid = svc.import_patient(_user(request), text)
            except UnicodeDecodeError:
                return gr.update(), None, _status(f"import file {path.name}: not UTF-8 text", ok=False)
            except EXPECTED as exc:
                return gr.update(), None, _status(str(exc), ok=False)
            finally:
                remove_upload(path)  # read or rejected: the plaintext upload goes now
            return gr.update(choices=_patient_choices(svc.search(_user(request))), value=pid), None, \
                _status(f"Imported as patient #{pid}")

        open_outputs = [open_pid, patient_head, notes_md, draft_md, item_pick]
        search_btn.click(guarded(do_search, 2), [query], [results, status], concurrency_limit=None)
        query.submit(guarded(do_search, 2), [query], [results, status], concurrency_limit=None)
        create_btn.click(guarded(do_create, 6 + len(N.FIELD_KEYS)), list(field_boxes.values()),
                         open_outputs + list(field_boxes.values()) + [status], concurrency_limit=None)
        open_btn.click(guarded(do_open, 8), [results], open_outputs + [chatbot, chat_raw, status],
                       concurrency_limit=None)
        import_btn.click(guarded(do_import, 3), [import_file], [results, import_file, status], concurrency_limit=None)
        demo.load(guarded(do_reopen, 8), [open_pid], open_outputs + [chatbot, chat_raw, status], concurrency_limit=None)

        # --- notes export ----------------------------------------------------------------
        def do_export(pid, kind, request: gr.Request):
            """Built in memory, handed out once to this counselor through a link (never a file on
            the server, never in Gradio's file cache)."""
            pid, user = _pid(pid), _user(request)
            text = (svc.export_markdown if kind == "md" else svc.export_json)(user, pid)
            url = desk.put(user, f"patient_{pid}.{kind}", text)
            link = (f"[Download patient_{pid}.{kind}]({url}) (one download, for you only, within "
                    f"{desk.ttl_s / 60:.0f} minutes; the file is plaintext, keep it safe)")
            return link, _status(f"Exported patient #{pid} ({kind}): use the download link under the buttons")

        def do_export_md(pid, request: gr.Request):
            return do_export(pid, "md", request)

        def do_export_json(pid, request: gr.Request):
            return do_export(pid, "json", request)

        export_md_btn.click(guarded(do_export_md, 2), [open_pid], [export_link, status], concurrency_limit=None)
        export_json_btn.click(guarded(do_export_json, 2), [open_pid], [export_link, status], concurrency_limit=None)

        # --- analysis and draft ----------------------------------------------------------
        def stream_updates(updates, pid, user):
            for u in updates:
                if not u.final:
                    yield u.text, gr.update(), gr.update(), gr.update(), _status(u.message or "generating…")
                else:
                    md, picker = draft_view(u.draft)
                    yield u.text, md, picker, gr.update(), _status(u.message, ok=u.ok)

        def do_analyze(pid, text, request: gr.Request):
            pid, user = _pid(pid), _user(request)
            yield from stream_updates(svc.stream_analysis(user, pid, text), pid, user)

        def do_regen_all(pid, request: gr.Request):
            pid, user = _pid(pid), _user(request)
            yield from stream_updates(svc.regenerate_all(user, pid), pid, user)

        def do_regen_item(pid, ref, request: gr.Request):
            pid, user = _pid(pid), _user(request)
            if not ref:
                raise N.InputProblem("pick an item of the draft to regenerate")
            yield from stream_updates(svc.regenerate_item(user, pid, ref), pid, user)

        gen_out = [stream_box, draft_md, item_pick, item_text, status]
        gen_kw = dict(concurrency_limit=a.concurrency_limit, concurrency_id="model")
        analyze_btn.click(guarded_stream(do_analyze, 5), [open_pid, said], gen_out, **gen_kw)
        regen_all_btn.click(guarded_stream(do_regen_all, 5), [open_pid], gen_out, **gen_kw)
        regen_item_btn.click(guarded_stream(do_regen_item, 5), [open_pid, item_pick], gen_out, **gen_kw)

        def do_pick(pid, ref, request: gr.Request):
            if not ref or pid in (None, ""):  # cleared by a new draft: leave the editor and status alone
                return gr.update(), gr.update(), gr.update()
            draft = svc.get_draft(_user(request), _pid(pid))
            item = N.get_item(draft, ref) if draft else {"text": "", "comment": ""}
            return item["text"], item["comment"], _status(f"Editing {ref}")

        def do_apply(pid, ref, text, comment, request: gr.Request):
            if not ref:
                raise N.InputProblem("pick an item of the draft to edit")
            draft = svc.edit_item(_user(request), _pid(pid), ref, text, comment)
            return N.draft_markdown(draft), _status(f"{ref} updated")

        def do_add(pid, kind, text, comment, request: gr.Request):
            draft, ref = svc.add_item(_user(request), _pid(pid), kind, text, comment)
            md, picker = draft_view(draft)
            return md, picker, _status(f"Added {ref}")

        def do_delete(pid, ref, request: gr.Request):
            if not ref:
                raise N.InputProblem("pick an item of the draft to delete")
            md, picker = draft_view(svc.delete_item(_user(request), _pid(pid), ref))
            return md, picker, _status(f"Deleted {ref}")

        def do_save(pid, request: gr.Request):
            user, pid = _user(request), _pid(pid)
            nid = svc.save_draft_as_note(user, pid)
            head, body = patient_view(user, pid)
            md, picker = draft_view(None)
            return body, md, picker, _status(f"Saved as note {nid} of patient #{pid}")

        def do_discard(pid, request: gr.Request):
            svc.discard_draft(_user(request), _pid(pid))
            md, picker = draft_view(None)
            return md, picker, _status("Draft discarded")

        def do_use_alternative(pid, request: gr.Request):
            md, picker = draft_view(svc.use_alternative(_user(request), _pid(pid)))
            return md, picker, _status("Now using the other analysis; the draft it replaced waits beside it")

        def do_dismiss_alternative(pid, request: gr.Request):
            md, picker = draft_view(svc.dismiss_alternative(_user(request), _pid(pid)))
            return md, picker, _status("The other analysis was dismissed")

        def show_alternative_buttons(md):
            """Every handler that shows a draft refreshes the draft view: follow it from there."""
            return gr.Row(visible=N.ALTERNATIVE_HEADING in (md or ""))

        quick = dict(concurrency_limit=None)
        item_pick.change(guarded(do_pick, 3), [open_pid, item_pick], [item_text, item_comment, status], **quick)
        apply_btn.click(guarded(do_apply, 2), [open_pid, item_pick, item_text, item_comment], [draft_md, status],
                        **quick)
        def do_add_reason(pid, text, comment, request: gr.Request):
            return do_add(pid, "reason", text, comment, request)

        def do_add_advice(pid, text, comment, request: gr.Request):
            return do_add(pid, "advice", text, comment, request)

        add_reason_btn.click(guarded(do_add_reason, 3), [open_pid, item_text, item_comment],
                             [draft_md, item_pick, status], **quick)
        add_advice_btn.click(guarded(do_add_advice, 3), [open_pid, item_text, item_comment],
                             [draft_md, item_pick, status], **quick)
        delete_btn.click(guarded(do_delete, 3), [open_pid, item_pick], [draft_md, item_pick, status], **quick)
        save_btn.click(guarded(do_save, 4), [open_pid], [notes_md, draft_md, item_pick, status], **quick)
        discard_btn.click(guarded(do_discard, 3), [open_pid], [draft_md, item_pick, status], **quick)
        use_alt_btn.click(guarded(do_use_alternative, 3), [open_pid], [draft_md, item_pick, status], **quick)
        dismiss_alt_btn.click(guarded(do_dismiss_alternative, 3), [open_pid], [draft_md, item_pick, status], **quick)
        draft_md.change(show_alternative_buttons, [draft_md], [alt_row], **quick)

        # --- training --------------------------------------------------------------------
        def do_train(pid, request: gr.Request):
            st = svc.start_training(_user(request), _pid(pid))
            return st.text(), gr.Timer(active=True), _status("Training started in the background; "
                                                             "you can keep working.")

        def do_tick(pid):
            if pid in (None, ""):
                return gr.update(), gr.Timer(active=False)
            try:
                st = svc.training_status(_pid(pid))
            except N.InputProblem:
                return gr.update(), gr.Timer(active=False)
            return st.text(), gr.Timer(active=st.state in ("queued", "running"))

        train_btn.click(guarded(do_train, 3), [open_pid], [train_md, timer, status], **quick)
        timer.tick(do_tick, [open_pid], [train_md, timer], **quick)

        # --- chat ------------------------------------------------------------------------
        def do_chat(pid, message, raw, with_notes, request: gr.Request):
            patient = _pid(pid) if pid not in (None, "") else None
            if with_notes and patient is None:
                raise N.InputProblem("no patient open: untick 'Use the open patient's notes' or open one")
            prior = [{"role": m["role"], "content": m["content"]} for m in (raw or [])]
            history = prior + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            for reply in svc.stream_chat(_user(request), message, prior, patient, with_notes):
                history[-1]["content"] = reply
                yield _chat_view(history), history, "", _status("replying…")
            yield _chat_view(history), history, "", _status("Reply complete")

        chat_out = [chatbot, chat_raw, chat_in, status]
        send_btn.click(guarded_stream(do_chat, 4), [open_pid, chat_in, chat_raw, use_notes], chat_out, **gen_kw)
        chat_in.submit(guarded_stream(do_chat, 4), [open_pid, chat_in, chat_raw, use_notes], chat_out, **gen_kw)

        # --- audit -----------------------------------------------------------------------
        def do_audit(request: gr.Request):
            svc.store.audit(_user(request), "read_audit_log", "audit")
            return [[r["at"], r["user"], r["action"], r["target"]] for r in svc.store.audit_log()]

        def do_verify(request: gr.Request):
            report = svc.store.verify_audit()
            svc.store.audit(_user(request), "verify_audit_log", "audit")
            return _status(report.text(), ok=report.ok)

        audit_btn.click(do_audit, None, [audit_df], **quick)
        verify_btn.click(do_verify, None, [status], **quick)
    demo.queue(default_concurrency_limit=a.concurrency_limit, max_size=a.queue_size)
    return demo


def free_port(host: str) -> int:
    """A port the OS says is free (for ``port: 0``)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def private_gradio_cache(data_dir: Path) -> tuple[Path, int, str | None]:
    """Gradio's upload and file cache in a private working folder under the data folder (0700,
    removed at exit, and at the next start after a crash), instead of the shared /tmp/gradio.
    Returns the folder, its lock and the ``GRADIO_TEMP_DIR`` it replaced."""
    folder, fd = open_workdir(data_dir, "gradio-")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder, fd, before


def launch(svc: CounselorService, *, host: str | None = None, port: int | None = None,
           block: bool = True, users: dict[str, str] | None = None, **kwargs) -> gr.Blocks:
    """Build and serve the UI; binds ``app.host`` (loopback by default). Returns the Blocks; with
    ``block=False`` call :func:`shutdown` on it to stop it and remove its private cache."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    a = svc.a
    host = host or a.host
    users = load_users(a) if users is None else users
    check_bind(host, users, a.users_env)
    cache = private_gradio_cache(svc.store.data_dir)
    desk = ExportDesk()
    throttle = LoginThrottle(max_failures=a.login_max_failures, lockout_s=a.login_lockout_s)
    demo = build_ui(svc, desk)
    port = a.port if port is None else port
    demo._phyassist_cache = cache
    try:
        demo.launch(server_name=host, server_port=port or free_port(host),
                    auth=make_auth(users, throttle, svc.store.audit), prevent_thread_lock=not block, share=False,
                    show_error=False, theme=local_theme(), ssr_mode=False, quiet=True, footer_links=[],
                    run_history=False, max_file_size=int(a.max_import_mb * 1024 * 1024),
                    app_kwargs={"middleware": [Middleware(GuardMiddleware, desk=desk, local_user=LOCAL_USER)]},
                    **kwargs)
    finally:
        if block:
            shutdown(demo)
    return demo


def shutdown(demo: gr.Blocks) -> None:
    """Stop the server and remove the private Gradio cache (uploads, anything Gradio copied)."""
    try:
        demo.close()
    finally:
        cache = getattr(demo, "_phyassist_cache", None)
        if cache is not None:
            folder, fd, before = cache
            close_workdir(folder, fd)
            if before is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = before
            demo._phyassist_cache = None
