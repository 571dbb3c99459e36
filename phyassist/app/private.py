"""Private working folders under the data folder for plaintext that must touch the disk for a while
(a patient adapter's training checkpoints, Gradio's upload cache): 0700, removed when the work
ends, and removed at the next start-up if the process was killed (a held lock marks the ones a
live process still uses, so a second app on the same data folder keeps its own)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

WORK_ROOT = ".tmp"
LOCK = ".in-use"


def work_root(data_dir: str | Path) -> Path:
    root = Path(data_dir) / WORK_ROOT
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    return root


def open_workdir(data_dir: str | Path, prefix: str) -> tuple[Path, int]:
    """A new private folder and the descriptor of its held lock (close it, then remove the folder)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=work_root(data_dir)))
    fd = os.open(folder / LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return folder, fd


def close_workdir(folder: Path, fd: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.close(fd)


@contextlib.contextmanager
def private_workdir(data_dir: str | Path, prefix: str) -> Iterator[Path]:
    folder, fd = open_workdir(data_dir, prefix)
    try:
        yield folder
    finally:
        close_workdir(folder, fd)


def _in_use(folder: Path) -> bool:
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return False  # no lock file: a folder left by a killed process before it took the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def sweep_workdirs(data_dir: str | Path) -> list[str]:
    """Remove the working folders no live process holds (left by a crash or kill -9); returns their names."""
    root = Path(data_dir) / WORK_ROOT
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and _in_use(entry):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
