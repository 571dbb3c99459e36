"""Write beside a run's outputs what produced them: the resolved config and library versions."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from phyassist.config import RunConfig, to_yaml
from phyassist.io import atomic_write_json, atomic_write_text

TRACKED = ("phyassist", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate",
           "datasets", "sentence-transformers", "sacrebleu", "rouge-score", "gradio", "wandb")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_run_info(cfg: RunConfig, out_dir: str | Path | None = None) -> Path:
    """Write ``config.resolved.yaml`` and ``versions.json``; return the output folder."""
    out = Path(out_dir) if out_dir else cfg.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.resolved.yaml", to_yaml(cfg))
    atomic_write_json(out / "versions.json", versions())
    return out


# ---------------------------------------------------------------- a run a reviewer can read

SUMMARY = "run_summary"


def final_metrics(history: list[dict]) -> dict:
    """From the Trainer's ``log_history``: the last value of each logged number, the lowest
    training and eval loss, and the Trainer's closing totals (runtime, mean loss)."""
    last: dict = {}
    for entry in history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                last[key] = value
    out = {k: last[k] for k in ("step", "epoch", "loss", "eval_loss", "learning_rate", "train_loss",
                                "train_runtime", "num_input_tokens_seen") if k in last}
    for key in ("loss", "eval_loss"):
        values = [(e[key], e.get("step")) for e in history if isinstance(e.get(key), (int, float))]
        if values:
            best = min(values)
            out[f"min_{key}"], out[f"min_{key}_step"] = best[0], best[1]
    return out


def wandb_offline_runs(out: Path) -> list[Path]:
    """The offline wandb run folders under ``<out>/wandb`` (what ``wandb sync`` uploads)."""
    return sorted((out / "wandb").glob("offline-run-*"))


def run_summary(cfg: RunConfig, out: Path, history: list[dict], plots: list[Path]) -> dict:
    """What a reviewer without wandb wants from a training run, as one JSON-able dict."""
    t = cfg.train
    return {
        "run": cfg.name, "model": cfg.model.name, "output_dir": str(out),
        "config": {"file": "config.resolved.yaml", "max_steps": t.max_steps, "learning_rate": t.learning_rate,
                   "batch_size": t.per_device_train_batch_size,
                   "gradient_accumulation_steps": t.gradient_accumulation_steps,
                   "lora": t.lora.model_dump(mode="json"), "load_in_4bit": cfg.model.quant.load_in_4bit,
                   "max_seq_length": cfg.model.max_seq_length, "seed": cfg.seed},
        "final_metrics": final_metrics(history),
        "plots": [str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p) for p in plots],
        "adapter": "adapter/", "trainer_state": "checkpoints/trainer_state.json",
        "wandb": {"mode": cfg.wandb.mode, "project": cfg.wandb.project,
                  "offline_runs": [str(p.relative_to(out)) for p in wandb_offline_runs(out)]},
    }


def summary_markdown(summary: dict) -> str:
    """The summary as a page: config, final metrics, plots (embedded), how to upload the wandb run."""
    lines = [f"# Run `{summary['run']}`: {summary['model']}", "",
             f"Written by the train stage beside `wandb/`; the full configuration is "
             f"[{summary['config']['file']}]({summary['config']['file']}).", "", "## Configuration", "",
             "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["config"].items() if k != "file"]
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in summary["final_metrics"].items()]
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in summary["plots"]]
    w = summary["wandb"]
    lines += ["", "## wandb", "", f"mode `{w['mode']}`, project `{w['project']}`."]
    for run in w["offline_runs"]:
        lines.append(f"Offline run `{run}`: `wandb sync {run}` (from this folder) uploads it.")
    return "\n".join(lines) + "\n"


def write_run_summary(cfg: RunConfig, out: str | Path, state_path: str | Path, plots: list[Path]) -> Path:
    """Write ``run_summary.json`` and ``run_summary.md`` into the run folder; return the .md path."""
    import json

    out = Path(out)
    history = json.loads(Path(state_path).read_text(encoding="utf-8")).get("log_history", [])
    summary = run_summary(cfg, out, history, plots)
    atomic_write_json(out / f"{SUMMARY}.json", summary)
    return atomic_write_text(out / f"{SUMMARY}.md", summary_markdown(summary))
