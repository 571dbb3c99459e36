"""The comparison table (per set: base vs fine-tuned vs majority baseline) as CSV, Markdown
and a bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from phyassist.io import atomic_path, atomic_write_text

COLUMNS = ["set", "system", "n", "unlabelled", "accuracy", "weighted_f1", "micro_f1", "macro_f1",
           "clf_weighted_f1", "bartscore", "bleu", "rouge1", "rouge2", "rougeL", "cosine",
           "length_quality", "mean_length"]
SYSTEM_ORDER = ["majority", "base", "finetuned"]
PLOT_METRICS = [("weighted_f1", "weighted F1 (rule labels)"), ("bartscore", "BARTScore"),
                ("rougeL", "ROUGE-L F1"), ("cosine", "embedding cosine")]


def comparison_frame(rows: Sequence[dict]):
    """One row per (set, system) with the table's columns (absent metrics are NaN)."""
    import pandas as pd

    if not rows:
        raise ValueError("no results to tabulate")
    df = pd.DataFrame(list(rows))
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df.reindex(columns=COLUMNS + extra)
    rank = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    df["_r"] = df["system"].map(lambda s: rank.get(s, len(rank)))
    return df.sort_values(["set", "_r"], kind="stable").drop(columns="_r").reset_index(drop=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def to_markdown(df, note: str = "") -> str:
    """A Markdown table of the non-empty columns; ``n/a`` where a metric was not computed."""
    cols = [c for c in df.columns if c in ("set", "system") or df[c].notna().any()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def save_table(df, out_dir: Path, stem: str = "comparison", note: str = "") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    with atomic_path(out_dir / f"{stem}.csv") as tmp:
        df.to_csv(tmp, index=False)
    md = atomic_write_text(out_dir / f"{stem}.md", to_markdown(df, note))
    return out_dir / f"{stem}.csv", md


def plot_comparison(df, path: Path, title: str = "IMHI test sets") -> Path:
    """Grouped bars per set, one group member per system, one panel per available metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [(m, t) for m, t in PLOT_METRICS if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise ValueError("nothing to plot: no metric columns have values")
    sets = list(dict.fromkeys(df["set"]))
    systems = [s for s in SYSTEM_ORDER if s in set(df["system"])] + \
              [s for s in dict.fromkeys(df["system"]) if s not in SYSTEM_ORDER]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 1.4 * len(sets) + 2), 2.8 * len(metrics)),
                             squeeze=False)
    width = 0.8 / len(systems)
    x = np.arange(len(sets))
    for ax, (m, label) in zip(axes[:, 0], metrics):
        for k, sysname in enumerate(systems):
            sub = df[df["system"] == sysname].set_index("set")
            vals = [sub[m].get(s, np.nan) if s in sub.index else np.nan for s in sets]
            ax.bar(x + (k - (len(systems) - 1) / 2) * width, vals, width, label=sysname)
        ax.set_xticks(x, sets)
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles, names, ncols=len(systems), loc="upper center", bbox_to_anchor=(0.5, 0.965))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
