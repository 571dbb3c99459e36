"""The main job: every stage in order, each through its notebook executed headless by
papermill, so that ``make run`` exercises exactly what a researcher runs cell by cell.

Executed copies land in ``<output_dir>/notebooks/``; committed notebooks carry no outputs.
Cells tagged ``gpu`` are replaced by a notice on machines without CUDA (nbdev-style). While it runs,
``phyassist run`` names each stage and cell and streams what the cells print (the stage's own
progress); a failed notebook ends in one line naming the cell, the error and the executed copy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from phyassist.config import RunConfig, apply_overrides, load_raw, validate
from phyassist.paths import NOTEBOOKS_DIR, REPO_ROOT
from phyassist.runinfo import write_run_info

NOTEBOOKS = ["01_data.ipynb", "02_finetune.ipynb", "03_evaluate.ipynb", "04_publish.ipynb"]
STAGE_OF = {"01_data.ipynb": "data", "02_finetune.ipynb": "train", "03_evaluate.ipynb": "evaluate",
            "04_publish.ipynb": "publish", "05_recipes.ipynb": "recipe"}
GPU_TAG = "gpu"
ENGINE = "phyassist"  # papermill engine that names each cell as it starts (progress_engine)


def notebook_config(config: str, overrides: dict | None = None, output_dir: str | None = None) -> RunConfig:
    """What a notebook's first cell calls: the run config from papermill's parameters.

    The working folder becomes the repo root, so that a notebook opened in Jupyter from
    ``notebooks/`` (or anywhere) reads and writes the same relative paths (``runs/<name>``,
    ``data/``, ``bench/``) as ``phyassist run`` and the command line do."""
    if Path.cwd().resolve() != REPO_ROOT:
        print(f"[notebook] working folder: {REPO_ROOT} (the config's relative paths start there)", flush=True)
        os.chdir(REPO_ROOT)
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


def _source_line(cell) -> str:
    """The first line of a cell that is code, not a comment: what a progress line names."""
    for line in "".join(cell.get("source", "")).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()[:70]
    return ""


def progress_engine():
    """papermill's nbclient engine, printing ``[run] <notebook> cell n/N: <code>`` as each code
    cell starts (the injected parameters cell counts as one)."""
    from papermill.engines import NBClientEngine

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, label: str = "", **kwargs):
            code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
            start = nb_man.cell_start

            def cell_start(cell, cell_index=None, **kw):
                if cell_index in code:
                    print(f"[run] {label} cell {code.index(cell_index) + 1}/{len(code)}: {_source_line(cell)}",
                          flush=True)
                return start(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    return ProgressEngine


def execute_notebook(nb_path: Path, out_dir: Path, parameters: dict, timeout: int = 3600,
                     progress: bool = False, verbose: bool = True, label: str = "") -> Path:
    """Execute ``nb_path`` into ``out_dir`` (cwd: the repo root). ``progress`` streams the cells'
    printed output to this process and names each cell as it starts; without ``verbose`` the
    kernel's own start-up notices are left out. A failing cell raises papermill's
    ``PapermillExecutionError`` after the executed copy (with the traceback) is written."""
    import papermill as pm
    from papermill.engines import papermill_engines

    out_dir.mkdir(parents=True, exist_ok=True)
    src = nb_path
    if not _has_cuda():
        src = strip_gpu_cells(nb_path, out_dir / f".{nb_path.name}.cpu.ipynb")
    out = out_dir / nb_path.name
    papermill_engines.register(ENGINE, progress_engine())
    extra = {"engine_name": ENGINE, "label": f"{label} {nb_path.name}".strip()} if progress else {}
    if progress:
        extra.update(stdout_file=sys.stdout, stderr_file=sys.stderr)
    if not verbose:
        extra["extra_arguments"] = ["--IPKernelApp.log_level=ERROR"]  # e.g. "running over TCP without encryption"
    try:
        pm.execute_notebook(str(src), str(out), parameters=parameters, cwd=str(REPO_ROOT),
                            kernel_name="python3", language="python", progress_bar=False, execution_timeout=timeout,
                            log_output=False, **extra)
    finally:
        if src != nb_path:
            src.unlink(missing_ok=True)
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failure_line(name: str, exc, executed: Path) -> str:
    """One line for a failed notebook: which cell, the error, where the executed copy is."""
    evalue = _ANSI.sub("", str(getattr(exc, "evalue", "") or exc)).strip().splitlines()
    ename = _ANSI.sub("", str(getattr(exc, "ename", "") or type(exc).__name__))
    count = getattr(exc, "exec_count", None)
    where = f" at cell {count}" if count is not None else ""  # = n of the progress line's "cell n/N"
    return (f"[run] {name} failed{where}: {ename}: {evalue[0] if evalue else ''}"
            f" (executed notebook with the traceback: {executed})")


class NotebookFailed(RuntimeError):
    """A notebook of the main job failed; the message is :func:`failure_line`."""


def run_notebooks(cfg: RunConfig, names: list[str] | None = None, verbose: bool = False) -> list[Path]:
    """Execute the stages' notebooks in order into ``<out>/notebooks/``; stops at the first that
    fails with :class:`NotebookFailed` (one line; the traceback is in the executed notebook)."""
    from papermill.exceptions import PapermillExecutionError

    out = write_run_info(cfg)
    params = {"config": str((out / "config.resolved.yaml").resolve()), "overrides": {},
              "output_dir": str(out.resolve())}
    done = []
    names = names or NOTEBOOKS
    for i, name in enumerate(names, 1):
        nb = NOTEBOOKS_DIR / name
        if not nb.exists():
            print(f"[run] {name}: not present in this version of the kit, skipped", flush=True)
            continue
        t0 = time.time()
        stage = STAGE_OF.get(name, name)
        print(f"[run] stage {i}/{len(names)}: {stage} ({name})", flush=True)
        try:
            done.append(execute_notebook(nb, out / "notebooks", params, progress=True, verbose=verbose,
                                         label=f"{stage} ·"))
        except PapermillExecutionError as exc:
            if verbose:
                print("\n".join(_ANSI.sub("", line) for line in exc.traceback), file=sys.stderr)
            raise NotebookFailed(failure_line(name, exc, out / "notebooks" / name)) from None
        print(f"[run] {name} done in {time.time() - t0:.0f}s -> {done[-1]}", flush=True)
    return done


def notebook_name(text: str) -> str:
    """``--only`` values: notebook file names. A ``key=value`` here is an override that ``--only``
    swallowed (it takes every word after it); said so, instead of skipping a notebook of that name."""
    if "=" in text or not text.endswith(".ipynb"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a notebook (NN_name.ipynb); put key=value overrides "
                                          "before --only")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", default=None, metavar="NOTEBOOK", type=notebook_name,
                        help=f"notebooks to run, in order (default: all: {' '.join(NOTEBOOKS)})")


def main(cfg: RunConfig, args: argparse.Namespace) -> int:
    try:
        run_notebooks(cfg, args.only, verbose=getattr(args, "verbose", False))
    except NotebookFailed as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    print(f"[run] outputs in {cfg.out}")
    return 0
