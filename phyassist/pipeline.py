"""The main job: every stage in order, each through its notebook executed headless by
papermill, so that ``make run`` exercises exactly what a researcher runs cell by cell.

Executed copies land in ``<output_dir>/notebooks/``; committed notebooks carry no outputs.
Cells tagged ``gpu`` are replaced by a notice on machines without CUDA (nbdev-style).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from phyassist.config import RunConfig, apply_overrides, load_config, load_raw, validate
from phyassist.paths import NOTEBOOKS_DIR, REPO_ROOT
from phyassist.runinfo import write_run_info

NOTEBOOKS = ["01_data.ipynb", "02_finetune.ipynb", "03_evaluate.ipynb", "04_publish.ipynb"]
GPU_TAG = "gpu"


def notebook_config(config: str, overrides: dict | None = None, output_dir: str | None = None) -> RunConfig:
    """What a notebook's first cell calls: the run config from papermill's parameters."""
    over = dict(overrides or {})
    if output_dir:
        over["output_dir"] = output_dir
    path, raw = load_raw(config)
    return validate(apply_overrides(raw, over), str(path))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def strip_gpu_cells(nb_path: Path, out_path: Path) -> Path:
    """Copy the notebook with ``gpu``-tagged cells turned into a printed notice."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code" and GPU_TAG in cell.get("metadata", {}).get("tags", []):
            cell["source"] = "print('skipped: this cell needs a CUDA GPU')"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(nb), encoding="utf-8")
    return out_path


def execute_notebook(nb_path: Path, out_dir: Path, parameters: dict, timeout: int = 3600) -> Path:
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    src = nb_path
    if not _has_cuda():
        src = strip_gpu_cells(nb_path, out_dir / f".{nb_path.name}.cpu.ipynb")
    out = out_dir / nb_path.name
    try:
        pm.execute_notebook(str(src), str(out), parameters=parameters, cwd=str(REPO_ROOT),
                            kernel_name="python3", language="python", progress_bar=False, execution_timeout=timeout,
                            log_output=False)
    finally:
        if src != nb_path:
            src.unlink(missing_ok=True)
    return out


def run_notebooks(cfg: RunConfig, names: list[str] | None = None) -> list[Path]:
    out = write_run_info(cfg)
    params = {"config": str((out / "config.resolved.yaml").resolve()), "overrides": {},
              "output_dir": str(out.resolve())}
    done = []
    for name in names or NOTEBOOKS:
        nb = NOTEBOOKS_DIR / name
        if not nb.exists():
            print(f"[run] {name}: not present in this version of the kit, skipped", flush=True)
            continue
        t0 = time.time()
        print(f"[run] {name} ...", flush=True)
        done.append(execute_notebook(nb, out / "notebooks", params))
        print(f"[run] {name} done in {time.time() - t0:.0f}s -> {done[-1]}", flush=True)
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="*", default=None, help="notebooks to run (default: all)")


def main(cfg: RunConfig, args: argparse.Namespace) -> int:
    run_notebooks(cfg, args.only)
    print(f"[run] outputs in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(load_config(sys.argv[1]), argparse.Namespace(only=None)))
