"""Notebook 04 runs headless (papermill) on smoke: the dry run, the card and the load-back check,
and it stops with a clear message when no adapter was trained in the run folder."""

from __future__ import annotations

import pytest

from phyassist.paths import NOTEBOOKS_DIR
from phyassist.pipeline import execute_notebook
from test_publish import make_adapter, make_cfg, write_eval

NB = NOTEBOOKS_DIR / "04_publish.ipynb"
FAST = {"model.quant.load_in_4bit": False, "publish.check_prompts": ["I feel anxious before exams."]}


def test_notebook_without_adapter_says_so(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError, match="no adapter here"):
        execute_notebook(NB, tmp_path / "nb", {"config": "smoke", "overrides": FAST, "output_dir": str(tmp_path)})


def test_notebook_dry_run_card_and_load_back(tmp_path):
    make_adapter(make_cfg(tmp_path), tmp_path / "adapter", seed=3)
    write_eval(tmp_path)
    out = execute_notebook(NB, tmp_path / "nb", {"config": "smoke", "overrides": FAST, "output_dir": str(tmp_path)})
    text = out.read_text()
    assert "dry run: would upload to" in text and "load-back check PASS" in text
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in text and "library_name: peft" in text
    assert (tmp_path / "publish" / "package" / "README.md").is_file()
