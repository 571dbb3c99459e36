"""pyproject declares what the kit imports; requirements.txt pins it; test tools stay apart."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from phyassist.paths import REPO_ROOT


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = lambda specs: {_norm(re.split(r"[<>=\[ ;]", s, maxsplit=1)[0]) for s in specs}  # noqa: E731
    return names(project["dependencies"]), names(project["optional-dependencies"]["test"])


def _pins(name: str) -> set[str]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    return {_norm(line.split("==")[0]) for line in lines if "==" in line and not line.startswith("#")}


def test_runtime_dependencies_are_pinned_and_test_tools_are_not_among_them():
    runtime, test = _declared()
    lock, test_lock = _pins("requirements.txt"), _pins("requirements-test.txt")
    assert runtime <= lock, runtime - lock
    assert test == {"pytest", "hypothesis", "playwright"} and test <= test_lock
    assert not (test_lock & lock) and not (test & runtime)
    assert "evaluate" not in lock  # imported nowhere: the metrics are the kit's own


def test_every_third_party_import_of_the_kit_is_declared():
    runtime, _ = _declared()
    dists = packages_distributions()
    optional = {"modelscope"}  # recipes: only to download SoulChatCorpus, with a message saying how to install it
    missing = {}
    for path in (REPO_ROOT / "phyassist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in ("phyassist", "bench") or top in optional:
                    continue
                providers = {_norm(d) for d in dists.get(top, [])}
                if not providers & runtime and top != "triton":  # triton comes with torch on Linux
                    missing.setdefault(top, []).append(path.name)
    assert not missing, missing


def test_make_run_needs_no_root_and_make_test_installs_the_system_packages():
    """`make -n -B` prints every recipe the target would run (setup included) without running any."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("make") is None:
        pytest.skip("make not installed")

    def recipe(target: str) -> str:
        return subprocess.run(["make", "-n", "-B", target], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout

    run, test = recipe("run"), recipe("test")
    assert "pip install -q -r requirements.txt" in run and "phyassist run" in run
    assert "setup_system.sh" not in run and "sudo" not in run and "requirements-test.txt" not in run
    assert "setup_system.sh" in test and "requirements-test.txt" in test and "pytest" in test
