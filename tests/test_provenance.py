"""bench/provenance.py: the source sha1 a raw JSON records names the commit that made it, also where the copy's
``.git`` is older than its working tree (the lent GPU machines)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import provenance as pv  # noqa: E402


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_source_sha1_finds_its_commit_and_a_stale_git_shows_dirty(tmp_path):
    (tmp_path / "phyassist").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "phyassist" / "a.py").write_text("x = 1\n")
    (tmp_path / "bench" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.md").write_text("not source\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    first = pv.source_sha1(tmp_path)
    (tmp_path / "phyassist" / "a.py").write_text("x = 3\n")  # the tree moves on, .git does not (stale copy)
    moved = pv.provenance(tmp_path)
    assert moved["source_sha1"] != first and moved["git_dirty"] is True
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "two")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert pv.provenance(tmp_path)["git_dirty"] is False
    assert pv.find_commit(moved["source_sha1"], tmp_path) == head
    assert pv.find_commit(first, tmp_path) not in (None, head)  # the first commit
    (tmp_path / "notes.md").write_text("changed, not source\n")
    assert pv.source_sha1(tmp_path) == moved["source_sha1"]
    assert pv.find_commit("0" * 40, tmp_path) is None
