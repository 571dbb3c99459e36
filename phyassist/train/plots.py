"""Loss and learning-rate curves from ``trainer_state.json``, for reviewers without wandb."""

from __future__ import annotations

import json
from pathlib import Path

from phyassist.io import atomic_path


def read_history(state_path: str | Path) -> list[dict]:
    path = Path(state_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: trainer_state.json not found (has training run?)")
    return json.loads(path.read_text(encoding="utf-8")).get("log_history", [])


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [r[0] for r in rows], [float(r[1]) for r in rows]


def _plot(steps, values, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, values, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_training(state_path: str | Path, images_dir: str | Path, prefix: str = "train") -> list[Path]:
    """Write ``<prefix>_loss.png`` (train and, if any, eval loss) and ``<prefix>_lr.png``."""
    history = read_history(state_path)
    images_dir = Path(images_dir)
    written = []
    steps, loss = series(history, "loss")
    if steps:
        written.append(_plot(steps, loss, "training loss (answer tokens)", "Training loss",
                             images_dir / f"{prefix}_loss.png"))
    steps, lr = series(history, "learning_rate")
    if steps:
        written.append(_plot(steps, lr, "learning rate", "Learning rate", images_dir / f"{prefix}_lr.png"))
    return written
