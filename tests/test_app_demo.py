"""demo.ipynb executes headless (papermill) and does not block on the server it launches."""

from __future__ import annotations

import json

from phyassist.paths import REPO_ROOT
from phyassist.pipeline import execute_notebook


def test_demo_notebook_runs_without_blocking(tmp_path):
    out = execute_notebook(REPO_ROOT / "demo.ipynb", tmp_path / "nb",
                           {"config": "smoke", "data_dir": str(tmp_path / "demo"),
                            "overrides": {"app.max_new_tokens": 24}}, timeout=600)
    text = json.dumps(json.loads(out.read_text())["cells"])
    assert "HTTP 200" in text and "Symptom type:" in text and "save_note_from_draft" in text
