"""Notebook 01 runs top to bottom on the smoke profile and on the real data when present."""

import json

from phyassist.paths import NOTEBOOKS_DIR
from phyassist.pipeline import execute_notebook

NB = NOTEBOOKS_DIR / "01_data.ipynb"


def _outputs(nb_path):
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    return "\n".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                     for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))


def test_committed_without_outputs():
    nb = json.loads(NB.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"]["tags"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_notebook_smoke(tmp_path):
    out = tmp_path / "run"
    done = execute_notebook(NB, tmp_path / "nb", {"config": "smoke", "overrides": {}, "output_dir": str(out)})
    text = _outputs(done)
    assert "train " in text and (out / "data" / "train.jsonl").exists()
    assert (out / "config.resolved.yaml").exists() and (out / "data" / "token_lengths.png").exists()
    nb = json.loads(done.read_text(encoding="utf-8"))
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert any("removed: links" in "".join(o.get("data", {}).get("text/html", ""))
               for c in nb["cells"] for o in c.get("outputs", []))


def test_notebook_real_data(shared_data, tmp_path):
    sources = [{"name": n, "n_rows": 30} for n in ("DR", "dreaddit", "Irf", "MultiWD", "SAD")]
    sources.append({"name": "counsel-chat", "kind": "counsel_chat", "n_rows": 50})
    overrides = {"data.data_dir": str(shared_data), "data.sources": sources}
    out = tmp_path / "run"
    execute_notebook(NB, tmp_path / "nb", {"config": "smoke", "overrides": overrides, "output_dir": str(out)})
    rep = json.loads((out / "data" / "cleaning_report.json").read_text(encoding="utf-8"))
    assert rep["sources"]["Irf"]["split"] == "val" and rep["sources"]["counsel-chat"]["sampled"] == 50
    assert rep["sources"]["SAD"]["raw"] > 5000
