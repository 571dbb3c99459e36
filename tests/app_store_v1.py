"""The app's store as written before schema 2 (commit 6141d6c), frozen for the migration test:
the tables, associated data ("patient", "note:{pid}", "draft:{pid}", "chat", "adapter:{pid}")
and adapter layout that databases made by earlier versions hold. Only what writes data is kept."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from phyassist.app.crypto import Cipher


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


class StoreV1:
    """A schema-1 SQLite store in ``data_dir``, written as the app did before schema 2."""

    def __init__(self, data_dir: Path, key: bytes):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cipher = Cipher(key)
        self.engine = create_engine(f"sqlite:///{self.data_dir / 'phyassist.sqlite'}")

        @event.listens_for(self.engine, "connect")
        def _wal(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        with self._session.begin() as s:
            s.add(Meta(name="key_check", value=self.cipher.key_check()))

    def _audit(self, s, user, action, target):
        s.add(AuditEntry(username=user, action=action, target=target))

    def create_patient(self, user, fields) -> int:
        with self._session.begin() as s:
            row = Patient(data=self.cipher.encrypt_json(fields, "patient"))
            s.add(row)
            s.flush()
            self._audit(s, user, "create_patient", f"patient:{row.id}")
            return row.id

    def add_note(self, user, pid, note) -> int:
        with self._session.begin() as s:
            row = Note(patient_id=pid, data=self.cipher.encrypt_json(note, f"note:{pid}"))
            s.add(row)
            s.flush()
            self._audit(s, user, "add_note", f"patient:{pid}/note:{row.id}")
            return row.id

    def save_draft(self, user, pid, draft) -> None:
        with self._session.begin() as s:
            row = s.get(Draft, pid)
            version = 1 if row is None else self.cipher.decrypt_json(row.data, f"draft:{pid}").get("version", 0) + 1
            blob = self.cipher.encrypt_json(dict(draft, version=version), f"draft:{pid}")
            if row is None:
                s.add(Draft(patient_id=pid, data=blob))
            else:
                row.data = blob
            self._audit(s, user, "save_draft", f"patient:{pid}")

    def add_chat(self, user, pid, role, content) -> None:
        with self._session.begin() as s:
            s.add(ChatMessage(username=user, patient_id=pid,
                              data=self.cipher.encrypt_json({"role": role, "content": content}, "chat")))
            self._audit(s, user, "chat", f"patient:{pid}" if pid else "chat")

    def seal_and_record_adapter(self, user, pid, plain: Path, n_notes: int) -> Path:
        """seal_adapter + record_adapter as they were: one folder per patient, weights bound to
        "adapter:{pid}", the config in the clear and unauthenticated."""
        dst = self.data_dir / "adapters" / f"patient_{pid}"
        cfg = json.loads((plain / "adapter_config.json").read_text(encoding="utf-8"))
        cfg["phyassist_patient_adapter"] = True
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True, mode=0o700)
        (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        (dst / "PATIENT_DATA").write_text("patient data\n", encoding="utf-8")
        (dst / "adapter_model.safetensors.enc").write_bytes(
            self.cipher.encrypt_bytes((plain / "adapter_model.safetensors").read_bytes(), f"adapter:{pid}"))
        with self._session.begin() as s:
            s.add(AdapterRecord(patient_id=pid, folder=str(dst.relative_to(self.data_dir)), n_notes=n_notes))
            self._audit(s, user, "train_adapter", f"patient:{pid}")
        return dst

    def close(self) -> None:
        self.engine.dispose()
