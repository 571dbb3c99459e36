"""Atomic writes: a killed job never leaves a half-written output file behind.

Files get the permissions any program's files get (``0o666`` less the umask), so teammates can
read a run's adapters, tables and plots; ``private=True`` keeps a file to its owner (``0o600``)
for patient data and keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _read_umask() -> int:
    """The process umask (reading it means setting it; done once, at import, before threads)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
PRIVATE_MODE = 0o600


def file_mode(private: bool = False) -> int:
    """``0o600`` for private files, else what ``open()`` would give: ``0o666`` less the umask."""
    return PRIVATE_MODE if private else 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    The temporary file is created ``0o600`` (``mkstemp``) and gets its final mode just before the
    rename, so a private file is never readable by others, not even half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode(private))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str, private: bool = False) -> Path:
    with atomic_path(path, private) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, private: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", private)


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict], private: bool = False) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), private)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON lines; a malformed line raises ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {i}: not valid JSON ({exc.msg})") from None
    return rows


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows to a resumable job's log and fsync: every batch written survives a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        # after a kill mid-line, start on a fresh line so the torn row alone is lost
        fh.write(("\n" if torn else "") + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def read_appended_jsonl(path: str | Path) -> Iterator[dict]:
    """The object rows of an :func:`append_jsonl` log; a line torn by a kill mid-write is skipped
    (the job redoes that row), and a missing file has none."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that a Trainer finished writing, or None.

    transformers writes a checkpoint's ``trainer_state.json`` last, and not atomically: a run
    killed while saving leaves a folder without it, or with half of it, which resuming would
    fail on. Such a folder is passed over for the one before it."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"[resume] {path}: unfinished checkpoint (no readable trainer_state.json), passed over", flush=True)
            continue
        return str(path)
    return None
