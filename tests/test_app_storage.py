"""The app's encrypted store: ciphertext only on disk, key handling, crash and concurrency
safety, audit entries, input validation, sealed adapters; SQLite and a real PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_concurrently

from phyassist.app import notes as N
from phyassist.app.crypto import Cipher, KeyProblem, encode_key, new_key
from phyassist.app.storage import Store, UnknownPatient
from phyassist.paths import REPO_ROOT

PLANTED = "Wilhelmina Quokkason"
SECRET_NOTE = "panic attacks on the tram to Oberkassel"


def _open(data: Path, key_file: Path, url: str | None = None) -> Store:
    return Store.open(data, database=url, key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=key_file)


def _fill(store: Store) -> int:
    pid = store.create_patient("alice", {"name": PLANTED, "age": "41", "mental_state": "anxious"})
    store.add_note("alice", pid, {"date": "2024-05-01", "question": SECRET_NOTE, "symptom_type": "panic",
                                  "reasons": ["crowds"], "advice": ["breathing"]})
    store.save_draft("alice", pid, {"question": SECRET_NOTE, "symptom_type": {"text": "x", "comment": PLANTED},
                                    "reasons": [], "advice": []})
    store.add_chat("alice", pid, "user", f"How is {PLANTED} doing?")
    return pid


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "data", tmp_path / "keys" / "app.key"


def test_ciphertext_only_on_disk(paths):
    data, key_file = paths
    store = _open(data, key_file)
    pid = _fill(store)
    assert store.get_patient("bob", pid)["name"] == PLANTED
    assert store.list_notes("bob", pid)[0]["question"] == SECRET_NOTE
    assert store.list_chat("alice")[0]["content"].endswith("doing?")
    store.close()
    files = [p for p in data.rglob("*") if p.is_file()]
    assert files
    for p in files:
        raw = p.read_bytes()
        for needle in (PLANTED, SECRET_NOTE, "anxious", "breathing"):
            assert needle.encode() not in raw, f"{needle!r} in plaintext in {p}"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not str(key_file.resolve()).startswith(str(data.resolve()))


def test_key_file_inside_data_dir_refused(tmp_path):
    with pytest.raises(KeyProblem, match="outside the data folder"):
        Store.open(tmp_path / "d", key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=tmp_path / "d" / "k.key")


def test_wrong_key_refused_and_nothing_touched(paths, monkeypatch):
    data, key_file = paths
    store = _open(data, key_file)
    _fill(store)
    store.close()
    before = _digest(data)
    monkeypatch.setenv("PHYASSIST_APP_KEY", encode_key(new_key()))
    with pytest.raises(KeyProblem, match="wrong key"):
        Store.open(data, key_file=key_file)
    monkeypatch.setenv("PHYASSIST_APP_KEY", "not-base64-!!")
    with pytest.raises(KeyProblem, match="base64"):
        Store.open(data, key_file=key_file)
    assert _digest(data) == before


def test_missing_key_refused_and_nothing_created(paths):
    data, key_file = paths
    _open(data, key_file).close()
    key_file.unlink()
    before = _digest(data)
    with pytest.raises(KeyProblem, match="no key"):
        _open(data, key_file)
    assert not key_file.exists(), "a new key must not be created for a store that has data"
    assert _digest(data) == before


def test_key_from_env_opens_store(paths, monkeypatch):
    data, key_file = paths
    key = new_key()
    monkeypatch.setenv("PHYASSIST_APP_KEY", encode_key(key))
    store = Store.open(data, key_file=key_file)
    pid = _fill(store)
    store.close()
    assert not key_file.exists()
    again = Store.open(data, key_file=key_file)
    assert again.get_patient("alice", pid)["name"] == PLANTED


def test_audit_entries_name_user_and_action(paths):
    data, key_file = paths
    store = _open(data, key_file)
    pid = _fill(store)
    store.get_patient("bob", pid)
    store.list_notes("bob", pid)
    log = store.audit_log()
    seen = {(e["user"], e["action"]) for e in log}
    assert {("alice", "create_patient"), ("alice", "add_note"), ("alice", "save_draft"), ("alice", "chat"),
            ("bob", "read_patient"), ("bob", "read_notes")} <= seen
    assert all(PLANTED not in e["target"] for e in log)


def test_unknown_patient_and_bad_input_change_nothing(paths):
    data, key_file = paths
    store = _open(data, key_file)
    pid = _fill(store)
    n_audit = len(store.audit_log())
    with pytest.raises(UnknownPatient):
        store.add_note("alice", 999, {"date": "2024-01-01"})
    with pytest.raises(UnknownPatient):
        store.get_patient("alice", "abc")
    for bad in ("{not json", '{"format": "other"}',
                '{"format": "phyassist-patient-v1", "patient": {"name": "X"}, "notes": [{"date": "yesterday"}]}',
                '{"format": "phyassist-patient-v1", "patient": {"name": ""}}',
                '{"format": "phyassist-patient-v1", "patient": {"name": "X", "hobby": "y"}}'):
        with pytest.raises(N.InputProblem):
            N.parse_import(bad, 1000)
    with pytest.raises(N.InputProblem, match="too long"):
        N.clean_patient_fields({"name": "x" * 2001}, 2000)
    with pytest.raises(N.InputProblem, match="empty"):
        N.check_text("What the patient said", "   ", 100)
    assert store.patient_count() == 1 and len(store.list_notes("alice", pid)) == 1
    assert len([e for e in store.audit_log() if e["action"] in ("add_note", "create_patient")]) == 2
    assert len(store.audit_log()) >= n_audit


def test_import_roundtrip(paths):
    data, key_file = paths
    store = _open(data, key_file)
    pid = _fill(store)
    text = N.export_json(store.get_patient("alice", pid), store.list_notes("alice", pid))
    fields, notes = N.parse_import(text, 4000)
    new = store.import_patient("alice", fields, notes)
    assert store.get_patient("alice", new)["name"] == PLANTED
    assert store.list_notes("alice", new)[0]["question"] == SECRET_NOTE
    md = N.export_markdown(store.get_patient("alice", new), store.list_notes("alice", new))
    assert "**Counseling question:** " + SECRET_NOTE in md and "1. crowds" in md


def test_concurrent_saves_from_two_sessions_both_land(paths):
    data, key_file = paths
    s1 = _open(data, key_file)
    pid = _fill(s1)
    s2 = _open(data, key_file)  # a second session: own engine and connections

    def writer(store, user):
        for i in range(15):
            store.add_note(user, pid, {"date": "2024-06-01", "question": f"{user} {i}", "symptom_type": "",
                                       "reasons": [], "advice": []})
            store.save_draft(user, pid, {"question": f"{user} {i}", "symptom_type": {"text": "", "comment": ""},
                                         "reasons": [], "advice": []})

    errors = run_concurrently(writer, ((s1, "alice"), (s2, "bob")))
    assert not errors
    questions = {n["question"] for n in s1.list_notes("carol", pid)}
    assert {f"alice {i}" for i in range(15)} <= questions and {f"bob {i}" for i in range(15)} <= questions


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from phyassist.app.storage import Store
    store = Store.open(Path(sys.argv[1]), key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=Path(sys.argv[2]))
    pid = int(sys.argv[3])
    i = 0
    while True:
        nid = store.add_note("alice", pid, {"date": "2024-07-01", "question": f"kill {i}", "symptom_type": "",
                                            "reasons": ["r" * 2000], "advice": []})
        print(nid, flush=True)
        i += 1
""")


def test_kill_during_writes_loses_nothing_committed(paths, tmp_path):
    data, key_file = paths
    store = _open(data, key_file)
    pid = _fill(store)
    store.close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(data), str(key_file), str(pid)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    committed = []
    deadline = time.time() + 60
    while len(committed) < 25 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)  # mid-transaction, most likely
    proc.wait()
    assert len(committed) >= 5, "writer did not get going"
    again = _open(data, key_file)
    ids = {n["id"] for n in again.list_notes("alice", pid)}
    assert set(committed) <= ids
    with again.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_parse_analysis_items_and_failure():
    ok = N.parse_analysis("Symptom type: insomnia\nReasons:\n1. Job loss.\n2) Worry at night\nAdvice:\n- Sleep diary\n"
                          "- Fixed wake time")
    assert ok["ok"] and ok["symptom_type"] == "insomnia"
    assert ok["reasons"] == ["Job loss.", "Worry at night"] and ok["advice"] == ["Sleep diary", "Fixed wake time"]
    md = N.parse_analysis("**Symptom type:** low mood\n**Reasons:**\n1. a\n**Advice:**\n1. b")
    assert md["ok"] and md["reasons"] == ["a"] and md["advice"] == ["b"]
    bad = N.parse_analysis("Symptom type: stress\nThe patient seems tired.")
    assert not bad["ok"] and "numbered reasons" in bad["problem"] and bad["raw"].startswith("Symptom type")
    assert N.parse_item("Reason 2: Lost the job.\nmore") == "Lost the job."


def test_draft_editing_and_note():
    d = N.new_draft("I feel low", N.parse_analysis("Symptom type: low mood\nReasons:\n1. a\nAdvice:\n1. b"))
    d, ref = N.add_item(d, "reason", "c", "check")
    assert ref == "reason 2" and N.item_refs(d) == ["symptom type", "reason 1", "reason 2", "advice 1"]
    d = N.set_item(d, "advice 1", text="b2", comment="shorter")
    d = N.delete_item(d, "reason 1")
    with pytest.raises(N.InputProblem):
        N.get_item(d, "reason 5")
    note = N.draft_to_note(d, "alice", "2024-01-02")
    assert note["reasons"] == ["c"] and note["advice"] == ["b2"] and note["symptom_type"] == "low mood"
    assert N.note_text(note) == "Symptom type: low mood\nReasons:\n1. c\nAdvice:\n1. b2"
    assert "not a diagnosis" in N.draft_markdown(d)


def test_context_budget_reports_what_was_left_out():
    from transformers import AutoTokenizer

    from phyassist.app.assistant import SYSTEM, analysis_task, build_prompt
    from phyassist.models.registry import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    patient = {"id": 1, "name": PLANTED, "personal_history": "long history " * 20}
    notes = [{"date": f"2024-01-{i:02d}", "question": f"visit {i} " + "words " * 60, "symptom_type": "s",
              "reasons": ["r"], "advice": ["a"]} for i in range(1, 9)]
    prompt, rep = build_prompt(tok, SYSTEM, analysis_task("I feel low"), patient, notes, 5, 700, "Symptom type:")
    assert rep.prompt_tokens <= 700 and 0 < rep.notes_used < 5
    assert "3 older note(s)" in rep.text() and "more earlier note(s)" in rep.text()
    assert "visit 8" in prompt and "visit 1 " not in prompt and prompt.endswith("Symptom type:")


def test_sealed_adapter_roundtrip_and_switch(tmp_path):
    """A patient adapter sealed at rest, marked, decrypted in memory and swapped on one model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from phyassist.app.adapters import (CONFIG, MARKER, SEALED_WEIGHTS, AdapterBank, adapter_folder,
                                        is_patient_adapter, open_sealed, seal_adapter)
    from phyassist.app.crypto import DamagedRecord

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).eval()
    pristine = copy.deepcopy(base)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    plain = tmp_path / "plain"
    lora.save_pretrained(plain)
    cipher = Cipher(new_key())
    data = tmp_path / "data"
    folder = seal_adapter(plain, data, cipher, 7, 1)
    assert folder == adapter_folder(data, 7) / "v1"
    assert (folder / MARKER).exists() and is_patient_adapter(folder) and is_patient_adapter(adapter_folder(data, 7))
    assert not (folder / "adapter_model.safetensors").exists()
    assert (folder / SEALED_WEIGHTS).read_bytes()[:8] != (plain / "adapter_model.safetensors").read_bytes()[:8]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref_base = base(ids).logits
    bank = AdapterBank(base, cipher, data, max_loaded=2)
    assert bank.activate(7) == "patient adapter #7"
    with torch.no_grad():
        with_adapter = base(ids).logits
    assert not torch.allclose(with_adapter, ref_base)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter, lora(ids).logits, rtol=1e-4, atol=1e-4)
    assert bank.activate(None) == "base model"
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, ref_base)
    torch.manual_seed(1)
    lora2 = get_peft_model(pristine, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    lora2.save_pretrained(tmp_path / "plain2")
    seal_adapter(tmp_path / "plain2", data, cipher, 8, 1)
    assert bank.activate(8) == "patient adapter #8"  # a second adapter on the same model
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, lora2(ids).logits, rtol=1e-4, atol=1e-4)
    bank.activate(7)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, with_adapter, rtol=1e-4, atol=1e-4)
    assert bank.last_switch_s < 1.0
    with pytest.raises(KeyProblem):
        open_sealed(folder, Cipher(new_key()), 7, 1)
    with pytest.raises(DamagedRecord, match="version 2"):  # another version's folder: not the current one
        open_sealed(folder, cipher, 7, 2)
    with pytest.raises(DamagedRecord):  # patient 8's adapter copied over patient 7's
        open_sealed(adapter_folder(data, 8) / "v1", cipher, 7, 1)
    cfg_text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text(cfg_text.replace('"r": 4', '"r": 2'))  # the config is authenticated
    with pytest.raises(DamagedRecord, match="adapter_config.json"):
        open_sealed(folder, cipher, 7, 1)


# --- PostgreSQL: a throwaway cluster on 127.0.0.1 --------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(cands[-1]) if cands else None


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (scripts/setup_system.sh installs them)")
    root = tmp_path_factory.mktemp("pg")
    pgdata = root / "cluster"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run it as the postgres system user
        runuser = shutil.which("runuser")
        if runuser is None or subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            pytest.skip("running as root without a 'postgres' user to own the cluster")
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
        for parent in root.parents:  # the postgres user must be able to reach the folder
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
        as_user = [runuser, "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(as_user + [initdb, "-D", str(pgdata), "-U", "phyassist", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    opts = f"-h 127.0.0.1 -p {port} -k {root}"
    subprocess.run(as_user + [pg_ctl, "-D", str(pgdata), "-o", opts, "-l", str(root / "pg.log"), "-w", "start"],
                   check=True, capture_output=True)
    yield f"postgresql+psycopg://phyassist@127.0.0.1:{port}/postgres"
    subprocess.run(as_user + [pg_ctl, "-D", str(pgdata), "-m", "fast", "-w", "stop"], capture_output=True)


def test_postgresql_store(postgres_url, tmp_path):
    data, key_file = tmp_path / "data", tmp_path / "keys" / "app.key"
    store = _open(data, key_file, postgres_url)
    pid = _fill(store)
    assert store.get_patient("bob", pid)["name"] == PLANTED
    with store.engine.connect() as conn:
        blobs = [bytes(r[0]) for r in conn.exec_driver_sql("SELECT data FROM patients UNION ALL "
                                                           "SELECT data FROM notes UNION ALL SELECT data FROM drafts")]
        assert blobs and all(PLANTED.encode() not in b and SECRET_NOTE.encode() not in b for b in blobs)
    other = _open(data, key_file, postgres_url)

    def writer(s, user):
        for i in range(10):
            s.add_note(user, pid, {"date": "2024-06-01", "question": f"{user} {i}", "symptom_type": "",
                                   "reasons": [], "advice": []})

    errors = run_concurrently(writer, ((store, "alice"), (other, "bob")))
    assert not errors and len(store.list_notes("carol", pid)) == 21
    assert ("bob", "add_note") in {(e["user"], e["action"]) for e in store.audit_log()}
    store.close()
    other.close()
    with pytest.raises(KeyProblem, match="wrong key"):
        Store.open(data, database=postgres_url, key=new_key())
