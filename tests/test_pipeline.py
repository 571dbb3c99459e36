import json
import subprocess
import sys

import nbformat
from pathlib import Path

from phyassist.pipeline import execute_notebook, notebook_config, strip_gpu_cells


def _nb(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('config = "smoke"\noverrides = {}\noutput_dir = None')
    params.metadata["tags"] = ["parameters"]
    gpu = nbformat.v4.new_code_cell("import torch\nassert torch.cuda.is_available()")
    gpu.metadata["tags"] = ["gpu"]
    body = nbformat.v4.new_code_cell(
        "from phyassist.pipeline import notebook_config\n"
        "cfg = notebook_config(config, overrides, output_dir)\n"
        "print('steps', cfg.train.max_steps, cfg.out)")
    nb.cells = [params, gpu, body]
    p = tmp_path / "t.ipynb"
    nbformat.write(nb, p)
    return p


def test_gpu_cells_replaced(tmp_path):
    out = strip_gpu_cells(_nb(tmp_path), tmp_path / "cpu.ipynb")
    cells = json.loads(out.read_text())["cells"]
    assert "skipped" in "".join(cells[1]["source"])


def test_notebook_executes_with_papermill_parameters(tmp_path):
    import torch

    nb = _nb(tmp_path)
    out = execute_notebook(nb, tmp_path / "out", {"config": "smoke", "overrides": {"train.max_steps": 3},
                                                  "output_dir": str(tmp_path / "o")})
    text = out.read_text()
    assert "steps 3" in text
    if not torch.cuda.is_available():
        assert "skipped: this cell needs a CUDA GPU" in text


def test_notebook_config_overrides(tmp_path):
    cfg = notebook_config("smoke", {"train.max_steps": 2}, str(tmp_path))
    assert cfg.train.max_steps == 2 and cfg.out == tmp_path


def test_unknown_stage_and_help():
    r = subprocess.run([sys.executable, "-m", "phyassist", "nosuchstage"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_committed_notebooks_have_no_outputs():
    from phyassist.paths import REPO_ROOT

    for nb in list((REPO_ROOT / "notebooks").glob("*.ipynb")) + list(REPO_ROOT.glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), nb


def test_progress_names_each_cell_and_streams_its_output(tmp_path, capsys):
    nb = _nb(tmp_path)
    execute_notebook(nb, tmp_path / "out", {"config": "smoke", "overrides": {"train.max_steps": 3},
                                            "output_dir": str(tmp_path / "o")},
                     progress=True, verbose=False, label="train ·")
    out = capsys.readouterr()
    # parameters, injected parameters, gpu (or its notice), body: four code cells
    assert "[run] train · t.ipynb cell 1/4: config = \"smoke\"" in out.out
    assert "[run] train · t.ipynb cell 4/4: from phyassist.pipeline import notebook_config" in out.out
    assert "steps 3" in out.out  # the cell's own print, streamed as it ran
    assert "without encryption" not in out.err


def test_failed_notebook_is_one_line_with_the_executed_copy(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    from phyassist.pipeline import failure_line

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    fail = nbformat.v4.new_code_cell("raise FileNotFoundError('runs/x/data/train.jsonl: not found\\nmore')")
    nb.cells = [params, fail]
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    try:
        execute_notebook(path, tmp_path / "out", {"x": 2})
    except PapermillExecutionError as exc:
        line = failure_line("bad.ipynb", exc, tmp_path / "out" / "bad.ipynb")
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("[run] bad.ipynb failed at cell 3: FileNotFoundError: runs/x/data/train.jsonl: not found")
    assert line.endswith(f"(executed notebook with the traceback: {tmp_path / 'out' / 'bad.ipynb'})")
    assert "FileNotFoundError" in (tmp_path / "out" / "bad.ipynb").read_text()


def test_notebook_config_works_from_any_folder(tmp_path, monkeypatch):
    import os

    from phyassist.paths import REPO_ROOT

    monkeypatch.chdir(tmp_path)  # as Jupyter started from notebooks/ or elsewhere
    cfg = notebook_config("smoke")
    assert os.getcwd() == str(REPO_ROOT) and (Path.cwd() / cfg.out).resolve() == REPO_ROOT / "runs" / "smoke"


def _tracked_contents() -> dict[str, str]:
    """Each tracked file of the checkout and a hash of its content on disk (commits made meanwhile
    change nothing here; a file a run rewrites does)."""
    import hashlib

    from phyassist.paths import REPO_ROOT

    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    return {f: hashlib.sha1((REPO_ROOT / f).read_bytes()).hexdigest() if (REPO_ROOT / f).is_file() else "absent"
            for f in files if f}


def test_main_job_reports_progress_and_leaves_the_tracked_tree_alone(tmp_path):
    """`phyassist run` on notebooks 01 and 02 (one training step): progress by stage and cell,
    the trainer's steps, no third-party banners; outputs readable by others, a run summary, cards
    that name the base model; and no tracked file of the checkout modified (plots go to the run)."""
    import os
    import stat

    from phyassist.paths import REPO_ROOT

    before = _tracked_contents()
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "phyassist", "run", "--only", "01_data.ipynb", "02_finetune.ipynb",
                        "-o", str(out), "train.max_steps=1", "train.logging_steps=1", "train.save_steps=1",
                        "model.max_seq_length=128", "data.cleaning.max_tokens=128", "wandb.mode=offline"],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=1200,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[run] stage 1/2: data (01_data.ipynb)" in r.stdout
    assert "[run] stage 2/2: train (02_finetune.ipynb)" in r.stdout
    assert "[run] train · 02_finetune.ipynb cell 6/" in r.stdout and "[train] step 1/1 · loss " in r.stdout
    both = r.stdout + r.stderr
    assert "wandb: " not in both and "Running in WANDB offline mode" not in both and "without encryption" not in both
    after = _tracked_contents()
    assert [f for f in before if after.get(f) != before[f]] == []
    summary = (out / "run_summary.md").read_text()
    assert "## Final metrics" in summary and "images/train_loss.png" in summary
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "adapter" / "README.md").read_text()
    assert "[None]" not in (out / "checkpoints" / "README.md").read_text()
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (out / "data" / "train.jsonl", out / "images" / "train_loss.png", out / "run_summary.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_run_stops_at_a_failed_notebook_with_one_line(tmp_path, monkeypatch, capsys):
    import argparse

    import phyassist.pipeline as pipeline
    from phyassist.config import load_config

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('config = "smoke"\noverrides = {}\noutput_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print('working')\nraise ValueError('data.sources is empty')")]
    nbformat.write(nb, nbs / "01_data.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", nbs)
    cfg = load_config("smoke", {"output_dir": str(tmp_path / "run")})
    args = argparse.Namespace(only=["01_data.ipynb", "02_finetune.ipynb"], verbose=False)
    assert pipeline.main(cfg, args) == 1
    out = capsys.readouterr()
    assert "[run] stage 1/2: data (01_data.ipynb)" in out.out and "working" in out.out
    assert "02_finetune" not in out.out  # stopped at the failure
    executed = tmp_path / "run" / "notebooks" / "01_data.ipynb"
    assert out.err.strip() == (f"[run] 01_data.ipynb failed at cell 3: ValueError: data.sources is empty "
                               f"(executed notebook with the traceback: {executed})")
