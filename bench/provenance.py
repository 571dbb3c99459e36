"""Where a benchmark's figures come from: the date, the kit's source and the commit, written into its raw JSON.

Why: a raw file must say what code made it. On the lent GPU machines the copy of the repository can carry an
older ``.git`` than the working tree that travels with it, so the commit alone can mislead (a run of
2026-12-02 printed the commit before the one it ran). The sha1 of the kit's source files is recorded too, and
``--find`` names the commit whose files have that sha1:

    python3 bench/provenance.py                  # this tree's provenance (JSON)
    python3 bench/provenance.py --find <sha1>    # the commit (of the last 300) whose source has this sha1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("phyassist", "bench")  # every .py file under these is the source a figure depends on


def _digest(files: list[tuple[str, bytes]]) -> str:
    """sha1 over the files' paths and contents in path order (a renamed file changes it too)."""
    h = hashlib.sha1()
    for path, data in sorted(files):
        h.update(path.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def source_sha1(root: Path = ROOT) -> str:
    """The sha1 of the ``.py`` files under :data:`SOURCE_DIRS` in the working tree (tracked or not)."""
    files = [(p.relative_to(root).as_posix(), p.read_bytes()) for d in SOURCE_DIRS for p in (root / d).rglob("*.py")
             if "__pycache__" not in p.parts]
    return _digest(files)


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def commit_sha1(commit: str, root: Path = ROOT) -> str | None:
    """:func:`source_sha1` of ``commit``'s tracked files (None when git cannot read them)."""
    names = _git(root, "ls-tree", "-r", "--name-only", commit, "--", *SOURCE_DIRS)
    if names is None:
        return None
    files = []
    for name in (n for n in names.splitlines() if n.endswith(".py")):
        data = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{name}"], capture_output=True).stdout
        files.append((name, data))
    return _digest(files)


def find_commit(sha1: str, root: Path = ROOT, last: int = 300) -> str | None:
    """The newest of the last ``last`` commits whose source has ``sha1``, or None."""
    for commit in (_git(root, "rev-list", f"--max-count={last}", "HEAD") or "").split():
        if commit_sha1(commit, root) == sha1:
            return commit
    return None


def provenance(root: Path = ROOT) -> dict:
    """What a raw JSON records: the UTC date, the source sha1, and the git HEAD with whether the tracked source
    differs from it (``git_dirty``; a stale ``.git`` shows as dirty, and the sha1 still names the source)."""
    head = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_DIRS)
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "source_sha1": source_sha1(root),
            "git_head": head.strip() if head else None, "git_dirty": bool(status.strip()) if status is not None else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--find", metavar="SHA1", help="print the commit whose source has this sha1")
    args = ap.parse_args(argv)
    if args.find:
        commit = find_commit(args.find)
        if commit is None:
            raise SystemExit(f"no commit of the last 300 has source sha1 {args.find}")
        print(commit)
    else:
        print(json.dumps(provenance(), indent=1))


if __name__ == "__main__":
    main()
