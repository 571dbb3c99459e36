"""The encrypted store: patients, notes, drafts, chats, adapters and the audit log.

SQLAlchemy over an embedded SQLite file by default, or PostgreSQL for a clinic server. Every
value a counselor typed is an AES-256-GCM blob (see :mod:`phyassist.app.crypto`); only ids,
timestamps, logins, action names and version counters are stored in the clear, so the audit log
and search by id work without the key while the text stays sealed. Each change and its audit
entry commit in one transaction: a crash loses nothing committed before, and concurrent saves
both land.

Each blob's associated data names its table, row id and owner (the patient; for chat messages
also the counselor), so a blob copied to another row, patient or counselor does not open. Drafts
and adapters carry a version that the patient's own (encrypted) row also holds, so an older draft
or adapter copied back is detected. A record that does not open is reported alone
(:class:`DamagedRecord`); the patient's other notes still load. The audit log is a chain of
HMACs under a key derived from the store's key (:meth:`Store.verify_audit`): an entry changed,
removed or reordered outside the app breaks the chain.

Schema 2 is the above; schema 1 (one associated data per kind, plain audit rows) is migrated on
open, in one transaction (:func:`migrate_v1`).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import (ForeignKey, Integer, LargeBinary, String, create_engine, event, func, inspect,
                        select, text)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from phyassist.app.crypto import Cipher, DamagedRecord, KeyProblem, resolve_key

log = logging.getLogger(__name__)
SQLITE_FILE = "phyassist.sqlite"
SCHEMA_VERSION = 2
AUDIT_HEAD = "audit_head"


class UnknownPatient(ValueError):
    """A patient id that is not in the store."""


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Meta(Base):
    __tablename__ = "meta"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(default=_now)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Draft(Base):
    __tablename__ = "drafts"
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), primary_key=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=_now)
    version: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(128), index=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AdapterRecord(Base):
    __tablename__ = "adapters"
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    folder: Mapped[str] = mapped_column(String(512))
    n_notes: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, default=0)


class AuditEntry(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=_now, index=True)
    username: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    mac: Mapped[str | None] = mapped_column(String(64), nullable=True)


def database_url(data_dir: Path, configured: str | None) -> str:
    return os.environ.get("PHYASSIST_APP_DB_URL") or configured or f"sqlite:///{data_dir / SQLITE_FILE}"


# --- associated data: what each blob is bound to ----------------------------------------------
def patient_aad(pid: int) -> str:
    return f"patients:{int(pid)}"


def note_aad(note_id: int, pid: int) -> str:
    return f"notes:{int(note_id)}:patient:{int(pid)}"


def draft_aad(pid: int, version: int) -> str:
    return f"drafts:patient:{int(pid)}:version:{int(version)}"


def chat_aad(message_id: int, user: str, pid: int | None) -> str:
    return f"chat_messages:{int(message_id)}:user:{user}:patient:{'-' if pid is None else int(pid)}"


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL + full sync for crash safety; BEGIN IMMEDIATE so two writers queue instead of failing."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _sqlite_pragmas(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    return Path(db) if db and db != ":memory:" else None


def _meta_rows(conn) -> dict[str, bytes] | None:
    """The meta table's rows through a DB-API connection (None: no meta table yet)."""
    cur = conn.cursor()
    cur.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'")
    if cur.fetchone() is None:
        return None
    cur.execute("SELECT name, value FROM meta")
    return {name: bytes(value) for name, value in cur.fetchall()}


def _read_sqlite_meta(path: Path) -> dict[str, bytes] | None:
    """The meta rows of a SQLite file, read without changing any file. Without a WAL file there is
    nothing but the main file to read: it is opened immutable (no lock, WAL or SHM file created).
    With one (a crash, or another process using the store), read-only with a read-only wal-index:
    no checkpoint merges the WAL into the main file and nothing deletes or rewrites the WAL and SHM
    files (a normal connection's close would). A WAL left without its SHM file cannot be read that
    way: the file and its WAL are then read from a private copy (ciphertext only)."""
    wal = path.with_name(path.name + "-wal")
    uri = f"file:{path}?immutable=1" if not wal.exists() else f"file:{path}?mode=ro&readonly_shm=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            return _meta_rows(conn)
        finally:
            conn.close()
    except sqlite3.OperationalError:
        with tempfile.TemporaryDirectory(prefix="phyassist-keycheck-") as tmp:
            copy_path = Path(tmp) / path.name
            shutil.copyfile(path, copy_path)
            if wal.exists():
                shutil.copyfile(wal, copy_path.with_name(copy_path.name + "-wal"))
            conn = sqlite3.connect(str(copy_path))
            try:
                return _meta_rows(conn)
            finally:
                conn.close()


def _read_meta(url: str) -> dict[str, bytes] | None:
    """The store's meta rows (key check, schema version) if it was initialised; changes nothing."""
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is None or not path.exists():
            return None
        return _read_sqlite_meta(path)
    probe = create_engine(url, pool_pre_ping=True)
    try:
        if not inspect(probe).has_table("meta"):
            return None
        with probe.connect() as conn:
            return {n: bytes(v) for n, v in conn.execute(select(Meta.name, Meta.value))}
    finally:
        probe.dispose()


@dataclass
class AuditReport:
    """What :meth:`Store.verify_audit` found: ``ok`` when every entry's MAC matches the chain and
    the chain ends where the store's head says."""

    entries: int = 0
    problems: list[str] = field(default_factory=list)
    head: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        if self.ok:
            return (f"audit log intact: {self.entries} entries, chain head {self.head} (record this head "
                    "elsewhere to detect a later truncation of the log's end)")
        return f"audit log NOT intact ({len(self.problems)} problem(s)):\n" + "\n".join(self.problems)


class Store:
    """Encrypted records behind one engine; every public method is one transaction."""

    def __init__(self, engine: Engine, cipher: Cipher, data_dir: Path):
        self.engine = engine
        self.cipher = cipher
        self.data_dir = data_dir
        self._session = sessionmaker(engine, expire_on_commit=False)
        self._audit_key = cipher.subkey("audit-log-mac")

    @classmethod
    def open(cls, data_dir: str | Path, *, database: str | None = None, key_env: str = "PHYASSIST_APP_KEY",
             key_file: str | Path = "~/.config/phyassist/app.key", key: bytes | None = None) -> "Store":
        """Open (or create) a store; a missing or wrong key raises KeyProblem before any write (the
        check reads the database read-only and changes no file). A schema-1 store is migrated."""
        data_dir = Path(data_dir).expanduser()
        url = database_url(data_dir, database)
        meta = _read_meta(url)
        existing = None if meta is None else meta.get("key_check")
        cipher = Cipher(key if key is not None else resolve_key(key_env, key_file, data_dir, existing is not None))
        if existing is not None:
            cipher.verify(existing)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = make_engine(url)
        store = cls(engine, cipher, data_dir)
        if existing is not None and "schema_version" not in meta:
            migrate_v1(store)
        Base.metadata.create_all(engine)
        if existing is None:
            store._init()
        return store

    def _init(self) -> None:
        with self._session.begin() as s:
            if s.get(Meta, "key_check") is None:
                s.add(Meta(name="key_check", value=self.cipher.key_check()))
            if s.get(Meta, "schema_version") is None:
                s.add(Meta(name="schema_version", value=str(SCHEMA_VERSION).encode()))
            if s.get(Meta, AUDIT_HEAD) is None:
                s.add(Meta(name=AUDIT_HEAD, value=b"0:"))

    def close(self) -> None:
        self.engine.dispose()

    # --- audit chain ---------------------------------------------------------------------
    def _mac(self, prev: str, row: AuditEntry) -> str:
        fields = [prev, str(row.id), row.at.isoformat(), row.username, row.action, row.target]
        return hmac.new(self._audit_key, "\x1f".join(fields).encode("utf-8"), hashlib.sha256).hexdigest()

    def _audit(self, s: Session, user: str, action: str, target: str) -> None:
        """Append an entry to the MAC chain. The head row is locked first, so appends queue
        (PostgreSQL: FOR UPDATE; SQLite: BEGIN IMMEDIATE already serializes writers)."""
        head = s.get(Meta, AUDIT_HEAD, with_for_update=True)
        if head is None:
            head = Meta(name=AUDIT_HEAD, value=b"0:")
            s.add(head)
        prev = bytes(head.value).decode("ascii").split(":", 1)[1]
        row = AuditEntry(at=_now(), username=user[:128], action=action[:64], target=target[:128])
        s.add(row)
        s.flush()
        row.mac = self._mac(prev, row)
        head.value = f"{row.id}:{row.mac}".encode("ascii")

    def verify_audit(self) -> AuditReport:
        """Recompute the audit log's MAC chain (needs the key: a MAC cannot be forged without it)."""
        report = AuditReport()
        prev = ""
        last_id = 0
        with self._session.begin() as s:
            for row in s.scalars(select(AuditEntry).order_by(AuditEntry.id)).yield_per(1000):
                report.entries += 1
                if row.mac is None or not hmac.compare_digest(self._mac(prev, row), row.mac):
                    report.problems.append(f"entry #{row.id} ({row.at:%Y-%m-%d %H:%M:%S} {row.username} {row.action}): "
                                           "MAC does not match: it, or an entry before it, was changed, removed "
                                           "or inserted outside the app")
                prev, last_id = row.mac or "", row.id
            head = s.get(Meta, AUDIT_HEAD)
        head_text = bytes(head.value).decode("ascii") if head is not None else "0:"
        if head_text != f"{last_id}:{prev}":
            report.problems.append(f"the log ends at entry #{last_id} but the store's head is entry "
                                   f"#{head_text.split(':', 1)[0]}: entries were removed from the end or the head "
                                   "was changed")
        report.head = head_text
        return report

    # --- helpers -------------------------------------------------------------------------
    def _patient(self, s: Session, patient_id: int, lock: bool = False) -> Patient:
        """The patient's row; ``lock`` holds it until the transaction ends (PostgreSQL: FOR UPDATE;
        SQLite's BEGIN IMMEDIATE already serializes writers). Ids are whole numbers: ``1.9``,
        ``True`` or ``"1x"`` are unknown patients, never patient 1."""
        ok = (isinstance(patient_id, int) and not isinstance(patient_id, bool)) or (
            isinstance(patient_id, str) and patient_id.strip().isdigit())
        row = s.get(Patient, int(patient_id), with_for_update=lock or None) if ok else None
        if row is None:
            raise UnknownPatient(f"unknown patient id {patient_id!r}")
        return row

    def _state(self, row: Patient) -> tuple[dict[str, Any], dict[str, Any]]:
        """(fields, counters) of a patient row; counters: draft version and whether a draft is
        stored, adapter version."""
        try:
            blob = self.cipher.decrypt_json(row.data, patient_aad(row.id))
        except KeyProblem:
            raise DamagedRecord(f"patient #{row.id}: the record does not open (changed, or copied from another "
                                "row, outside the app)") from None
        return blob["fields"], blob["counters"]

    def _write_state(self, row: Patient, fields: dict[str, Any], counters: dict[str, Any]) -> None:
        row.data = self.cipher.encrypt_json({"fields": fields, "counters": counters}, patient_aad(row.id))

    def _fields(self, row: Patient) -> dict[str, Any]:
        return dict(self._state(row)[0], id=row.id)

    def _new_patient(self, s: Session, fields: dict[str, Any]) -> Patient:
        row = Patient(data=b"")
        s.add(row)
        s.flush()  # the id first: the blob is bound to it
        self._write_state(row, fields, {"draft": 0, "draft_live": False, "adapter": 0})
        return row

    def _new_note(self, s: Session, pid: int, note: dict[str, Any]) -> Note:
        row = Note(patient_id=pid, data=b"")
        s.add(row)
        s.flush()
        row.data = self.cipher.encrypt_json(note, note_aad(row.id, pid))
        return row

    # --- patients ------------------------------------------------------------------------
    def create_patient(self, user: str, fields: dict[str, Any]) -> int:
        with self._session.begin() as s:
            row = self._new_patient(s, fields)
            self._audit(s, user, "create_patient", f"patient:{row.id}")
            return row.id

    def update_patient(self, user: str, patient_id: int, fields: dict[str, Any]) -> None:
        with self._session.begin() as s:
            row = self._patient(s, patient_id, lock=True)
            _old, counters = self._state(row)
            self._write_state(row, fields, counters)
            row.updated_at = _now()
            self._audit(s, user, "update_patient", f"patient:{row.id}")

    def get_patient(self, user: str, patient_id: int) -> dict[str, Any]:
        with self._session.begin() as s:
            row = self._patient(s, patient_id)
            self._audit(s, user, "read_patient", f"patient:{row.id}")
            return self._fields(row)

    def list_patients(self, user: str, query: str = "") -> list[dict[str, Any]]:
        """All patients whose decrypted fields contain ``query`` (case-insensitive); a record that
        does not open is listed as damaged (without a query) and the others still show.

        Search runs after decryption: a counselor's caseload is small, and an index over
        plaintext would defeat the encryption."""
        q = query.strip().lower()
        with self._session.begin() as s:
            rows = s.scalars(select(Patient).order_by(Patient.id)).all()
            out = []
            for r in rows:
                try:
                    out.append(self._fields(r))
                except DamagedRecord:
                    log.error("patient #%s: record does not open", r.id)
                    self._audit(s, user, "damaged_record", f"patient:{r.id}")
                    out.append({"id": r.id, "name": "(damaged record: does not open)", "damaged": True})
            self._audit(s, user, "search_patients", f"patients:{len(out)}")
        return [p for p in out if not q or (not p.get("damaged") and any(q in str(v).lower() for v in p.values()))]

    def import_patient(self, user: str, fields: dict[str, Any], notes: list[dict[str, Any]]) -> int:
        """A patient and their notes in one transaction: all of it lands or none."""
        with self._session.begin() as s:
            row = self._new_patient(s, fields)
            for note in notes:
                self._new_note(s, row.id, note)
            self._audit(s, user, "import_patient", f"patient:{row.id}/notes:{len(notes)}")
            return row.id

    def patient_count(self) -> int:
        with self._session.begin() as s:
            return s.scalar(select(func.count()).select_from(Patient))

    # --- notes ---------------------------------------------------------------------------
    def add_note(self, user: str, patient_id: int, note: dict[str, Any]) -> int:
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            row = self._new_note(s, p.id, note)
            self._audit(s, user, "add_note", f"patient:{p.id}/note:{row.id}")
            return row.id

    def list_notes_checked(self, user: str, patient_id: int) -> tuple[list[dict[str, Any]], list[int]]:
        """(notes oldest first, ids of the patient's notes that do not open). A damaged note (changed,
        or copied from another row or patient) is reported alone; the others load."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            rows = s.scalars(select(Note).where(Note.patient_id == p.id).order_by(Note.id)).all()
            notes, damaged = [], []
            for r in rows:
                try:
                    notes.append(dict(self.cipher.decrypt_json(r.data, note_aad(r.id, p.id)), id=r.id))
                except KeyProblem:
                    damaged.append(r.id)
                    log.error("patient #%s: note %s does not open", p.id, r.id)
                    self._audit(s, user, "damaged_record", f"patient:{p.id}/note:{r.id}")
            self._audit(s, user, "read_notes", f"patient:{p.id}")
            return notes, damaged

    def list_notes(self, user: str, patient_id: int) -> list[dict[str, Any]]:
        """Notes oldest first (the ones that open; see :meth:`list_notes_checked`)."""
        return self.list_notes_checked(user, patient_id)[0]

    # --- drafts --------------------------------------------------------------------------
    def _read_draft(self, p: Patient, row: Draft | None, counters: dict[str, Any]) -> dict[str, Any] | None:
        """The stored draft, checked against the patient's counters: a draft restored from an older
        copy, copied from another patient, or one removed outside the app raises DamagedRecord."""
        if row is None:
            if counters["draft_live"]:
                raise DamagedRecord(f"patient #{p.id}: the draft was removed outside the app; discard it to go on")
            return None
        if not counters["draft_live"] or row.version != counters["draft"]:
            raise DamagedRecord(f"patient #{p.id}: the stored draft is not the latest one saved (an older copy "
                                "restored outside the app); discard it to go on")
        try:
            return self.cipher.decrypt_json(row.data, draft_aad(p.id, row.version))
        except KeyProblem:
            raise DamagedRecord(f"patient #{p.id}: the draft does not open (changed or copied outside the "
                                "app); discard it to go on") from None

    def update_draft(self, user: str, patient_id: int,
                     change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
                     read_current: bool = True) -> dict[str, Any] | None:
        """Read, change and write the patient's draft in one transaction with the patient locked, so
        concurrent changes (two sessions, an edit during a generation) queue instead of overwriting
        each other. ``change`` gets the stored draft (None if there is none; not read at all with
        ``read_current`` False) and returns the new one (None discards it); an exception from it
        leaves everything as it was. Every stored draft carries ``version``, one more than the last
        draft saved for the patient (the patient's row keeps the count). Returns what was stored."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id, lock=True)
            fields, counters = self._state(p)
            row = s.get(Draft, p.id)
            current = self._read_draft(p, row, counters) if read_current else None
            draft = change(copy.deepcopy(current))
            if draft is None:
                if row is not None:
                    s.delete(row)
                if counters["draft_live"]:
                    self._write_state(p, fields, dict(counters, draft_live=False))
                self._audit(s, user, "discard_draft", f"patient:{p.id}")
                return None
            version = int(counters["draft"]) + 1
            draft = dict(draft, version=version)
            blob = self.cipher.encrypt_json(draft, draft_aad(p.id, version))
            if row is None:
                s.add(Draft(patient_id=p.id, data=blob, version=version))
            else:
                row.data, row.version, row.updated_at = blob, version, _now()
            self._write_state(p, fields, dict(counters, draft=version, draft_live=True))
            self._audit(s, user, "save_draft", f"patient:{p.id}")
            return draft

    def save_draft(self, user: str, patient_id: int, draft: dict[str, Any] | None) -> dict[str, Any] | None:
        """Store the patient's working draft as given (``None`` discards it, a damaged one too)."""
        return self.update_draft(user, patient_id, lambda _current: draft, read_current=False)

    def get_draft(self, user: str, patient_id: int) -> dict[str, Any] | None:
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            _fields, counters = self._state(p)
            draft = self._read_draft(p, s.get(Draft, p.id), counters)
            self._audit(s, user, "read_draft", f"patient:{p.id}")
            return draft

    def commit_draft(self, user: str, patient_id: int,
                     note: dict[str, Any] | Callable[[dict[str, Any] | None], dict[str, Any]]) -> int:
        """Write the note and drop the draft in one transaction: never both, never neither. ``note``
        may be a function of the stored draft, called with the patient locked, so an edit that
        lands just before the save is in the note rather than lost."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id, lock=True)
            fields, counters = self._state(p)
            draft = s.get(Draft, p.id)
            if callable(note):
                note = note(self._read_draft(p, draft, counters))
            row = self._new_note(s, p.id, note)
            if draft is not None:
                s.delete(draft)
            self._write_state(p, fields, dict(counters, draft_live=False))
            self._audit(s, user, "save_note_from_draft", f"patient:{p.id}/note:{row.id}")
            return row.id

    # --- chat ----------------------------------------------------------------------------
    def add_chat(self, user: str, patient_id: int | None, role: str, content: str) -> None:
        with self._session.begin() as s:
            pid = self._patient(s, patient_id).id if patient_id is not None else None
            row = ChatMessage(username=user, patient_id=pid, data=b"")
            s.add(row)
            s.flush()
            row.data = self.cipher.encrypt_json({"role": role, "content": content}, chat_aad(row.id, user, pid))
            self._audit(s, user, "chat", f"patient:{pid}" if pid else "chat")

    def list_chat(self, user: str, limit: int = 50) -> list[dict[str, str]]:
        """The counselor's last messages; one that does not open is shown as such, the others load."""
        with self._session.begin() as s:
            rows = s.scalars(select(ChatMessage).where(ChatMessage.username == user)
                             .order_by(ChatMessage.id.desc()).limit(limit)).all()
            out = []
            for r in reversed(rows):
                try:
                    out.append(self.cipher.decrypt_json(r.data, chat_aad(r.id, r.username, r.patient_id)))
                except KeyProblem:
                    self._audit(s, user, "damaged_record", f"chat:{r.id}")
                    out.append({"role": "assistant", "content": "(a stored message does not open: changed or "
                                                                "moved outside the app)", "damaged": True})
            return out

    # --- adapters ------------------------------------------------------------------------
    def next_adapter_version(self, patient_id: int) -> int:
        """The version the patient's next adapter gets (one more than the last recorded)."""
        with self._session.begin() as s:
            return int(self._state(self._patient(s, patient_id))[1]["adapter"]) + 1

    def record_adapter(self, user: str, patient_id: int, folder: str, n_notes: int, version: int) -> None:
        """Make sealed adapter ``version`` (in ``folder``, relative to the data folder) the patient's
        current one; the patient's row keeps the version, so an older record copied back is detected."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id, lock=True)
            fields, counters = self._state(p)
            if int(version) != int(counters["adapter"]) + 1:
                raise RuntimeError(f"patient #{p.id}: adapter version {version} is not the next one "
                                   f"({int(counters['adapter']) + 1}); another adapter was recorded meanwhile")
            row = s.get(AdapterRecord, p.id)
            if row is None:
                s.add(AdapterRecord(patient_id=p.id, folder=folder, n_notes=n_notes, version=int(version)))
            else:
                row.folder, row.n_notes, row.version, row.created_at = folder, n_notes, int(version), _now()
            self._write_state(p, fields, dict(counters, adapter=int(version)))
            self._audit(s, user, "train_adapter", f"patient:{p.id}/adapter:v{int(version)}")

    def adapter_location(self, patient_id: int) -> tuple[Path, int] | None:
        """(folder, version) of the patient's current adapter, None if they have none. A record
        removed or rolled back outside the app raises DamagedRecord: the patient is never silently
        served by another model than the one trained for them."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            current = int(self._state(p)[1]["adapter"])
            row = s.get(AdapterRecord, p.id)
            if row is None and current == 0:
                return None
            if row is None or row.version != current:
                raise DamagedRecord(f"patient #{p.id}: the adapter record is not the latest one trained "
                                    f"(version {current}): it was removed or rolled back outside the app; retrain")
            return self.data_dir / row.folder, row.version

    def adapter_for(self, patient_id: int) -> AdapterRecord | None:
        with self._session.begin() as s:
            ok = isinstance(patient_id, int) and not isinstance(patient_id, bool)
            return s.get(AdapterRecord, int(patient_id)) if ok or str(patient_id).isdigit() else None

    def adapter_records(self) -> list[tuple[int, int]]:
        """(patient id, version) of every recorded adapter (for the start-up sweep)."""
        with self._session.begin() as s:
            return [(r.patient_id, r.version) for r in s.scalars(select(AdapterRecord))]

    def adapter_count(self) -> int:
        with self._session.begin() as s:
            return s.scalar(select(func.count()).select_from(AdapterRecord))

    # --- audit ---------------------------------------------------------------------------
    def audit(self, user: str, action: str, target: str) -> None:
        with self._session.begin() as s:
            self._audit(s, user, action, target)

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        with self._session.begin() as s:
            rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)).all()
            return [dict(at=r.at.isoformat(timespec="seconds"), user=r.username, action=r.action,
                         target=r.target) for r in rows]


# --- schema 1 -> 2 ----------------------------------------------------------------------------
V1_PATIENT, V1_CHAT = "patient", "chat"


def _add_column(conn, table: str, column: str, ddl: str) -> None:
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


def migrate_v1(store: Store) -> None:
    """Schema 1 -> 2 in one transaction: new columns, every blob re-encrypted from its kind's
    associated data to its row's, drafts and adapters given versions (held by the patient's row too),
    adapters re-sealed into version folders (the old files go after the commit: a crash before it
    re-runs the migration on the untouched data), the audit rows chained with MACs. A blob that does
    not open with the old associated data is left as it is and reported as damaged when read."""
    from phyassist.app.adapters import (CONFIG, SEALED_WEIGHTS, prune_versions, seal_weights)

    cipher, data_dir = store.cipher, store.data_dir
    legacy_folders: list[Path] = []
    with store.engine.begin() as conn:
        _add_column(conn, "drafts", "version", "INTEGER NOT NULL DEFAULT 0")
        _add_column(conn, "adapters", "version", "INTEGER NOT NULL DEFAULT 0")
        _add_column(conn, "audit", "mac", "VARCHAR(64)")
        with Session(bind=conn) as s:
            for p in s.scalars(select(Patient).order_by(Patient.id)):
                try:
                    fields = cipher.decrypt_json(p.data, V1_PATIENT)
                except KeyProblem:
                    log.error("migration: patient #%s does not open; left as it is", p.id)
                    continue
                counters = {"draft": 0, "draft_live": False, "adapter": 0}
                for n in s.scalars(select(Note).where(Note.patient_id == p.id)):
                    try:
                        n.data = cipher.encrypt_json(cipher.decrypt_json(n.data, f"note:{p.id}"), note_aad(n.id, p.id))
                    except KeyProblem:
                        log.error("migration: note %s of patient #%s does not open; left as it is", n.id, p.id)
                d = s.get(Draft, p.id)
                if d is not None:
                    try:
                        draft = cipher.decrypt_json(d.data, f"draft:{p.id}")
                        version = max(1, int(draft.get("version") or 1))
                        d.data, d.version = cipher.encrypt_json(dict(draft, version=version), draft_aad(p.id, version)), version
                        counters.update(draft=version, draft_live=True)
                    except KeyProblem:
                        log.error("migration: the draft of patient #%s does not open; dropped", p.id)
                        s.delete(d)
                a = s.get(AdapterRecord, p.id)
                if a is not None:
                    old = data_dir / a.folder
                    try:
                        weights = cipher.decrypt_bytes((old / SEALED_WEIGHTS).read_bytes(), f"adapter:{p.id}")
                        cfg = json.loads((old / CONFIG).read_text(encoding="utf-8"))
                    except (OSError, KeyProblem, ValueError):
                        log.error("migration: the adapter of patient #%s does not open; its record is dropped "
                                  "(retrain it)", p.id)
                        s.delete(a)
                    else:
                        folder = seal_weights(cfg, weights, data_dir, cipher, p.id, 1)
                        a.folder, a.version = str(folder.relative_to(data_dir)), 1
                        counters["adapter"] = 1
                        legacy_folders.append(old)
                p.data = cipher.encrypt_json({"fields": fields, "counters": counters}, patient_aad(p.id))
            for c in s.scalars(select(ChatMessage)):
                try:
                    c.data = cipher.encrypt_json(cipher.decrypt_json(c.data, V1_CHAT),
                                                 chat_aad(c.id, c.username, c.patient_id))
                except KeyProblem:
                    log.error("migration: chat message %s does not open; left as it is", c.id)
            prev, last = "", 0
            for row in s.scalars(select(AuditEntry).order_by(AuditEntry.id)):
                row.mac = store._mac(prev, row)
                prev, last = row.mac, row.id
            s.flush()
            for name, value in (("schema_version", str(SCHEMA_VERSION).encode()),
                                (AUDIT_HEAD, f"{last}:{prev}".encode("ascii"))):
                s.merge(Meta(name=name, value=value))
            s.flush()
            store._audit(s, "system", "migrate_schema", f"schema:1->{SCHEMA_VERSION}")
            s.commit()
    for old in legacy_folders:  # schema-1 files, now sealed again in v1/
        for name in (SEALED_WEIGHTS, CONFIG):
            (old / name).unlink(missing_ok=True)
        prune_versions(data_dir, int(old.name.split("_")[-1]), keep=1)
    log.info("store migrated to schema %d", SCHEMA_VERSION)


__all__ = ["Store", "UnknownPatient", "KeyProblem", "DamagedRecord", "AuditReport", "database_url", "migrate_v1"]
