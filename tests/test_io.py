"""Atomic writes: normal permissions for run outputs, owner-only for private files."""

import os
import stat

import pytest

from phyassist.io import atomic_path, atomic_write_json, atomic_write_jsonl, atomic_write_text, file_mode


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_respect_the_umask_and_private_files_stay_private(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    normal = 0o666 & ~mask
    assert file_mode() == normal and file_mode(private=True) == 0o600
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == normal
    assert _mode(atomic_write_json(tmp_path / "a.json", {"a": 1})) == normal
    assert _mode(atomic_write_jsonl(tmp_path / "a.jsonl", [{"a": 1}])) == normal
    # the same file written private again loses the others' read bit
    assert _mode(atomic_write_text(tmp_path / "a.txt", "y", private=True)) == 0o600
    assert _mode(atomic_write_jsonl(tmp_path / "p.jsonl", [{"note": "patient"}], private=True)) == 0o600
    # a plain open() in the same folder gets the same mode as the kit's outputs
    with open(tmp_path / "plain.txt", "w") as fh:
        fh.write("x")
    assert _mode(tmp_path / "plain.txt") == normal


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
