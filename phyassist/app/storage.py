"""The encrypted store: patients, notes, drafts, chats, adapters and the audit log.

SQLAlchemy over an embedded SQLite file by default, or PostgreSQL for a clinic server. Every
value a counselor typed is an AES-256-GCM blob (see :mod:`phyassist.app.crypto`); only ids,
timestamps, logins and action names are stored in the clear, so the audit log and search by
id work without the key while the text stays sealed. Each change and its audit entry commit
in one transaction: a crash loses nothing committed before, and concurrent saves both land.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import (ForeignKey, Integer, LargeBinary, String, create_engine, event, func, inspect,
                        select)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from phyassist.app.crypto import Cipher, KeyProblem, resolve_key

SQLITE_FILE = "phyassist.sqlite"


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


class AuditEntry(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=_now, index=True)
    username: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))


def database_url(data_dir: Path, configured: str | None) -> str:
    return os.environ.get("PHYASSIST_APP_DB_URL") or configured or f"sqlite:///{data_dir / SQLITE_FILE}"


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


def _sqlite_file_exists(url: str) -> bool:
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    return bool(db) and db != ":memory:" and Path(db).exists()


def _stored_key_check(engine: Engine) -> bytes | None:
    """The key-check blob if this store was initialised; reads only, creates nothing."""
    if not inspect(engine).has_table("meta"):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(Meta.value).where(Meta.name == "key_check")).first()
    return row[0] if row else None


class Store:
    """Encrypted records behind one engine; every public method is one transaction."""

    def __init__(self, engine: Engine, cipher: Cipher, data_dir: Path):
        self.engine = engine
        self.cipher = cipher
        self.data_dir = data_dir
        self._session = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, data_dir: str | Path, *, database: str | None = None, key_env: str = "PHYASSIST_APP_KEY",
             key_file: str | Path = "~/.config/phyassist/app.key", key: bytes | None = None) -> "Store":
        """Open (or create) a store; a missing or wrong key raises KeyProblem before any write."""
        data_dir = Path(data_dir).expanduser()
        url = database_url(data_dir, database)
        is_sqlite = url.startswith("sqlite")
        if is_sqlite and not _sqlite_file_exists(url):
            existing = None
        else:
            probe = make_engine(url)
            existing = _stored_key_check(probe)
            probe.dispose()
        cipher = Cipher(key if key is not None else resolve_key(key_env, key_file, data_dir, existing is not None))
        if existing is not None:
            cipher.verify(existing)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        store = cls(engine, cipher, data_dir)
        if existing is None:
            store._init_key_check()
        return store

    def _init_key_check(self) -> None:
        with self._session.begin() as s:
            if s.get(Meta, "key_check") is None:
                s.add(Meta(name="key_check", value=self.cipher.key_check()))

    def close(self) -> None:
        self.engine.dispose()

    # --- helpers -------------------------------------------------------------------------
    def _audit(self, s: Session, user: str, action: str, target: str) -> None:
        s.add(AuditEntry(username=user, action=action, target=target))

    def _patient(self, s: Session, patient_id: int, lock: bool = False) -> Patient:
        """The patient's row; ``lock`` holds it until the transaction ends (PostgreSQL: FOR UPDATE;
        SQLite's BEGIN IMMEDIATE already serializes writers)."""
        ok = str(patient_id).lstrip("-").isdigit()
        row = s.get(Patient, int(patient_id), with_for_update=lock or None) if ok else None
        if row is None:
            raise UnknownPatient(f"unknown patient id {patient_id!r}")
        return row

    def _fields(self, row: Patient) -> dict[str, Any]:
        return dict(self.cipher.decrypt_json(row.data, "patient"), id=row.id)

    # --- patients ------------------------------------------------------------------------
    def create_patient(self, user: str, fields: dict[str, Any]) -> int:
        with self._session.begin() as s:
            row = Patient(data=self.cipher.encrypt_json(fields, "patient"))
            s.add(row)
            s.flush()
            self._audit(s, user, "create_patient", f"patient:{row.id}")
            return row.id

    def update_patient(self, user: str, patient_id: int, fields: dict[str, Any]) -> None:
        with self._session.begin() as s:
            row = self._patient(s, patient_id)
            row.data = self.cipher.encrypt_json(fields, "patient")
            row.updated_at = _now()
            self._audit(s, user, "update_patient", f"patient:{row.id}")

    def get_patient(self, user: str, patient_id: int) -> dict[str, Any]:
        with self._session.begin() as s:
            row = self._patient(s, patient_id)
            self._audit(s, user, "read_patient", f"patient:{row.id}")
            return self._fields(row)

    def list_patients(self, user: str, query: str = "") -> list[dict[str, Any]]:
        """All patients whose decrypted fields contain ``query`` (case-insensitive).

        Search runs after decryption: a counselor's caseload is small, and an index over
        plaintext would defeat the encryption."""
        q = query.strip().lower()
        with self._session.begin() as s:
            rows = s.scalars(select(Patient).order_by(Patient.id)).all()
            out = [self._fields(r) for r in rows]
            self._audit(s, user, "search_patients", f"patients:{len(out)}")
        return [p for p in out if not q or any(q in str(v).lower() for v in p.values())]

    def import_patient(self, user: str, fields: dict[str, Any], notes: list[dict[str, Any]]) -> int:
        """A patient and their notes in one transaction: all of it lands or none."""
        with self._session.begin() as s:
            row = Patient(data=self.cipher.encrypt_json(fields, "patient"))
            s.add(row)
            s.flush()
            for note in notes:
                s.add(Note(patient_id=row.id, data=self.cipher.encrypt_json(note, f"note:{row.id}")))
            self._audit(s, user, "import_patient", f"patient:{row.id}/notes:{len(notes)}")
            return row.id

    def patient_count(self) -> int:
        with self._session.begin() as s:
            return s.scalar(select(func.count()).select_from(Patient))

    # --- notes ---------------------------------------------------------------------------
    def add_note(self, user: str, patient_id: int, note: dict[str, Any]) -> int:
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            row = Note(patient_id=p.id, data=self.cipher.encrypt_json(note, f"note:{p.id}"))
            s.add(row)
            s.flush()
            self._audit(s, user, "add_note", f"patient:{p.id}/note:{row.id}")
            return row.id

    def list_notes(self, user: str, patient_id: int) -> list[dict[str, Any]]:
        """Notes oldest first."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            rows = s.scalars(select(Note).where(Note.patient_id == p.id).order_by(Note.id)).all()
            self._audit(s, user, "read_notes", f"patient:{p.id}")
            return [dict(self.cipher.decrypt_json(r.data, f"note:{p.id}"), id=r.id) for r in rows]

    # --- drafts --------------------------------------------------------------------------
    def update_draft(self, user: str, patient_id: int,
                     change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Read, change and write the patient's draft in one transaction with the patient locked, so
        concurrent changes (two sessions, an edit during a generation) queue instead of overwriting
        each other. ``change`` gets the stored draft (None if there is none) and returns the new one
        (None discards it); an exception from it leaves everything as it was. Every stored draft
        carries ``version``, one more than the draft it replaced. Returns what was stored."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id, lock=True)
            row = s.get(Draft, p.id)
            current = None if row is None else self.cipher.decrypt_json(row.data, f"draft:{p.id}")
            draft = change(copy.deepcopy(current))
            if draft is None:
                if row is not None:
                    s.delete(row)
                self._audit(s, user, "discard_draft", f"patient:{p.id}")
                return None
            draft = dict(draft, version=int((current or {}).get("version", 0)) + 1)
            blob = self.cipher.encrypt_json(draft, f"draft:{p.id}")
            if row is None:
                s.add(Draft(patient_id=p.id, data=blob))
            else:
                row.data, row.updated_at = blob, _now()
            self._audit(s, user, "save_draft", f"patient:{p.id}")
            return draft

    def save_draft(self, user: str, patient_id: int, draft: dict[str, Any] | None) -> dict[str, Any] | None:
        """Store the patient's working draft as given (``None`` discards it)."""
        return self.update_draft(user, patient_id, lambda _current: draft)

    def get_draft(self, user: str, patient_id: int) -> dict[str, Any] | None:
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            row = s.get(Draft, p.id)
            self._audit(s, user, "read_draft", f"patient:{p.id}")
            return None if row is None else self.cipher.decrypt_json(row.data, f"draft:{p.id}")

    def commit_draft(self, user: str, patient_id: int,
                     note: dict[str, Any] | Callable[[dict[str, Any] | None], dict[str, Any]]) -> int:
        """Write the note and drop the draft in one transaction: never both, never neither. ``note``
        may be a function of the stored draft, called with the patient locked, so an edit that
        lands just before the save is in the note rather than lost."""
        with self._session.begin() as s:
            p = self._patient(s, patient_id, lock=True)
            draft = s.get(Draft, p.id)
            if callable(note):
                note = note(None if draft is None else self.cipher.decrypt_json(draft.data, f"draft:{p.id}"))
            row = Note(patient_id=p.id, data=self.cipher.encrypt_json(note, f"note:{p.id}"))
            s.add(row)
            if draft is not None:
                s.delete(draft)
            s.flush()
            self._audit(s, user, "save_note_from_draft", f"patient:{p.id}/note:{row.id}")
            return row.id

    # --- chat ----------------------------------------------------------------------------
    def add_chat(self, user: str, patient_id: int | None, role: str, content: str) -> None:
        with self._session.begin() as s:
            pid = self._patient(s, patient_id).id if patient_id is not None else None
            s.add(ChatMessage(username=user, patient_id=pid,
                              data=self.cipher.encrypt_json({"role": role, "content": content}, "chat")))
            self._audit(s, user, "chat", f"patient:{pid}" if pid else "chat")

    def list_chat(self, user: str, limit: int = 50) -> list[dict[str, str]]:
        with self._session.begin() as s:
            rows = s.scalars(select(ChatMessage).where(ChatMessage.username == user)
                             .order_by(ChatMessage.id.desc()).limit(limit)).all()
            return [self.cipher.decrypt_json(r.data, "chat") for r in reversed(rows)]

    # --- adapters ------------------------------------------------------------------------
    def record_adapter(self, user: str, patient_id: int, folder: str, n_notes: int) -> None:
        with self._session.begin() as s:
            p = self._patient(s, patient_id)
            row = s.get(AdapterRecord, p.id)
            if row is None:
                s.add(AdapterRecord(patient_id=p.id, folder=folder, n_notes=n_notes))
            else:
                row.folder, row.n_notes, row.created_at = folder, n_notes, _now()
            self._audit(s, user, "train_adapter", f"patient:{p.id}")

    def adapter_for(self, patient_id: int) -> AdapterRecord | None:
        with self._session.begin() as s:
            return s.get(AdapterRecord, int(patient_id))

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


__all__ = ["Store", "UnknownPatient", "KeyProblem", "database_url"]
