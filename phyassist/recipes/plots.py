"""Curves and bars for the recipes, drawn from the trainers' saved ``log_history``.

Each plot reads only a list of log dicts (what ``trainer.state.log_history`` holds and what
each step saves as JSON), so a plot can be redrawn from a finished run without retraining.
"""

from __future__ import annotations

from pathlib import Path

from phyassist.io import atomic_path


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key, in step order."""
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h and h[key] is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.6))


def plot_curves(history: list[dict], keys: dict[str, str], title: str, path: Path,
                ylabel: str = "value") -> Path:
    """One line per logged key (``{log key: legend label}``); a key never logged is an error."""
    present = {k: v for k, v in keys.items() if series(history, k)[0]}
    if not present:
        raise ValueError(f"{title}: none of {sorted(keys)} was logged; nothing to plot")
    fig, ax = _figure()
    for key, label in present.items():
        x, y = series(history, key)
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_bars(values: dict[str, float], title: str, path: Path, ylabel: str) -> Path:
    """Bars with their values written on top (e.g. mean answer length SFT vs RL)."""
    fig, ax = _figure()
    bars = ax.bar(list(values), list(values.values()), color=["#4C72B0", "#DD8452", "#55A868", "#C44E52"][:len(values)])
    for b, v in zip(bars, values.values()):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_grouped(table: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """Grouped bars: metric -> {model: value} (recipe A: base vs fine-tuned)."""
    import numpy as np

    metrics = list(table)
    models = list(next(iter(table.values())))
    fig, axes = _figure()
    width = 0.8 / len(models)
    x = np.arange(len(metrics))
    for i, m in enumerate(models):
        vals = [table[k][m] for k in metrics]
        axes.bar(x + i * width - 0.4 + width / 2, vals, width, label=m)
    axes.set_xticks(x, metrics)
    axes.set_title(title)
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    return _save(fig, path)
