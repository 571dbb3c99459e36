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


def test_appended_jsonl_survives_a_torn_last_line(tmp_path):
    from phyassist.io import append_jsonl, read_appended_jsonl

    log = tmp_path / "sub" / "log.jsonl"
    assert list(read_appended_jsonl(log)) == []
    append_jsonl(log, [{"i": 0, "text": "a"}, {"i": 1, "text": "ü"}])
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('{"i": 2, "te')  # a kill mid-write
    append_jsonl(log, [{"i": 3}])
    assert list(read_appended_jsonl(log)) == [{"i": 0, "text": "a"}, {"i": 1, "text": "ü"}, {"i": 3}]
    log.write_text('[1]\n{"i": 4}\n', encoding="utf-8")  # not an object: skipped
    assert list(read_appended_jsonl(log)) == [{"i": 4}]
