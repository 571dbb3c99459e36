"""notebooks/05_recipes.ipynb runs headless with recipe A's smoke config (papermill)."""

import json

from phyassist.paths import NOTEBOOKS_DIR
from phyassist.pipeline import execute_notebook


def test_recipes_notebook_runs_soulchat_smoke(tmp_path):
    out = tmp_path / "run"
    params = {"config": "recipes/soulchat-smoke", "output_dir": str(out),
              "overrides": {"model.max_seq_length": 128, "recipe.predict.max_examples": 1,
                            "recipe.predict.max_new_tokens": 4}}
    execute_notebook(NOTEBOOKS_DIR / "05_recipes.ipynb", tmp_path / "nb", params, timeout=900)
    metrics = json.loads((out / "predict" / "metrics.json").read_text())
    assert set(metrics) == {"base", "fine-tuned"}
    assert {"bleu", "cosine", "rouge1", "length_quality"} <= set(metrics["base"])
    assert (out / "images" / "soulchat_metrics.png").exists()
