"""The comparison table (per set: base vs fine-tuned vs majority baseline) as CSV, Markdown
and a bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from phyassist.io import atomic_path, atomic_write_text

MODES = ("official", "robust")
_LABEL_COLS = ["weighted_f1", "weighted_f1_lo", "weighted_f1_hi", "accuracy", "accuracy_lo", "accuracy_hi",
               "macro_f1", "micro_f1", "unlabelled", "p_vs_base", "p_vs_majority"]
COLUMNS = (["set", "system", "n"] + [f"{m}_{c}" for m in MODES for c in _LABEL_COLS]
           + ["clf_weighted_f1", "bartscore", "bleu", "rouge1", "rouge2", "rougeL", "cosine",
              "length_quality", "mean_length", "lang"])
SYSTEM_ORDER = ["majority", "base", "finetuned"]
PLOT_METRICS = [("official_weighted_f1", "weighted F1\n(official labels)"),
                ("robust_weighted_f1", "weighted F1\n(robust labels)"), ("bartscore", "BARTScore"),
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


def _with_ci(r, col: str) -> str:
    v, lo, hi = r.get(col), r.get(f"{col}_lo"), r.get(f"{col}_hi")
    if _fmt(v) == "n/a" or _fmt(lo) == "n/a":
        return _fmt(v)
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def to_markdown(df, note: str = "") -> str:
    """A Markdown table of the non-empty columns; intervals folded into their metric as
    ``value [lo, hi]``; ``n/a`` where a metric was not computed."""
    cols = [c for c in df.columns if (c in ("set", "system") or df[c].notna().any())
            and not c.endswith(("_lo", "_hi"))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_with_ci(r, c) if f"{c}_lo" in df.columns else _fmt(r[c])
                                       for c in cols) + " |")
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
            vals = np.array([sub[m].get(s, np.nan) if s in sub.index else np.nan for s in sets], float)
            xs = x + (k - (len(systems) - 1) / 2) * width
            err = None
            if f"{m}_lo" in df.columns:
                lo = np.array([sub[f"{m}_lo"].get(s, np.nan) if s in sub.index else np.nan for s in sets], float)
                hi = np.array([sub[f"{m}_hi"].get(s, np.nan) if s in sub.index else np.nan for s in sets], float)
                if not np.isnan(lo).all():
                    err = np.vstack([vals - lo, hi - vals])  # NaN where a value is missing: no bar drawn
            bars = ax.bar(xs, np.nan_to_num(vals), width, label=sysname)
            if err is not None:
                ok = ~np.isnan(err).any(axis=0)
                ax.errorbar(xs[ok], vals[ok], yerr=err[:, ok], fmt="none", ecolor="black", capsize=2, linewidth=1)
            for xi, v, b in zip(xs, vals, bars):  # a zero is a visible tick, a missing value says n/a
                if np.isnan(v):
                    ax.text(xi, 0, " n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="grey")
                elif v == 0:
                    ax.plot([xi - width / 2, xi + width / 2], [0, 0], color=b.get_facecolor(), linewidth=3)
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


def plot_confusions(rows, out_dir: Path) -> list[Path]:
    """``confusion_<mode>.png``: one heat map per (set, system), rows = gold, columns = predicted,
    counts written in the cells (rows normalised for the colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labelled = [r for r in rows if r.get("_labels")]
    if not labelled:
        return []
    sets = list(dict.fromkeys(r["set"] for r in labelled))
    systems = [s for s in SYSTEM_ORDER if any(r["system"] == s for r in labelled)] + \
              [s for s in dict.fromkeys(r["system"] for r in labelled) if s not in SYSTEM_ORDER]
    paths = []
    for mode in dict.fromkeys(m for r in labelled for m in r["_labels"]):
        fig, axes = plt.subplots(len(sets), len(systems), squeeze=False,
                                 figsize=(3.2 * len(systems), 3.0 * len(sets)))
        for i, name in enumerate(sets):
            for j, sysname in enumerate(systems):
                ax = axes[i, j]
                r = next((r for r in labelled if r["set"] == name and r["system"] == sysname), None)
                if r is None or mode not in r["_labels"]:
                    ax.axis("off")
                    continue
                cm = r["_labels"][mode]["confusion"]
                m = np.array(cm["matrix"], float)
                norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
                ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
                k = len(cm["labels"])
                for a in range(k):
                    for b in range(k):
                        ax.text(b, a, int(m[a, b]), ha="center", va="center", fontsize=6 if k > 5 else 8,
                                color="white" if norm[a, b] > 0.6 else "black")
                short = [lab[:6] for lab in cm["labels"]]
                ax.set_xticks(range(k), short, rotation=90, fontsize=7)
                ax.set_yticks(range(k), short, fontsize=7)
                ax.set_title(f"{name} / {sysname}", fontsize=9)
                if j == 0:
                    ax.set_ylabel("gold")
                if i == len(sets) - 1:
                    ax.set_xlabel("predicted")
        fig.suptitle(f"confusion matrices, {mode} labels")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        path = Path(out_dir) / f"confusion_{mode}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_curve(curve: dict, path: Path, mode: str = "official") -> Path:
    """Weighted F1 against training records seen, one line per set, its majority baseline dashed in
    the same colour (a learning curve: does more data lift a set off its baseline?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    points = sorted(curve["points"].values(), key=lambda p: p["records"])
    if not points:
        raise ValueError("learning curve: no points")
    sets = list(points[0]["sets"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, name in enumerate(sets):
        colour = f"C{k}"
        xs = [p["records"] for p in points if name in p["sets"]]
        ys = [p["sets"][name][mode]["weighted_f1"] for p in points if name in p["sets"]]
        ax.plot(xs, ys, "o-", color=colour, label=name)
        maj = curve.get("majority", {}).get(name, {}).get(mode)
        if maj is not None:
            ax.axhline(maj, color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("training records seen")
    ax.set_ylabel(f"weighted F1 ({mode} labels)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(ncols=len(sets), fontsize=8, loc="lower right")
    ax.set_title(f"label-only answers ({curve.get('tokens')} new tokens); dashed: majority baseline")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def headline_table(rows, mode: str = "official", other: str | None = "robust") -> str:
    """The compact README table: per set, weighted F1 of majority, base and fine-tuned with 95 %
    intervals in ``mode`` (and fine-tuned in ``other``), and the paired p-values."""
    def ci(r, m):
        if r is None or r.get(f"{m}_weighted_f1") is None:
            return "n/a"
        v, lo, hi = r[f"{m}_weighted_f1"], r.get(f"{m}_weighted_f1_lo"), r.get(f"{m}_weighted_f1_hi")
        return f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")

    head = ["set (n)", "majority", f"base ({mode})", f"fine-tuned ({mode})"]
    head += [f"fine-tuned ({other})"] if other else []
    head += ["p vs base", "p vs majority"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(r["set"] for r in rows):
        by = {r["system"]: r for r in rows if r["set"] == name}
        ft = by.get("finetuned")
        n = next(iter(by.values()))["n"]
        maj = by.get("majority")
        cells = [f"{name} ({n:,})", f"{maj[f'{mode}_weighted_f1']:.2f}" if maj else "n/a",
                 ci(by.get("base"), mode),
                 f"**{ci(ft, mode)}**" if ft and ft.get(f"{mode}_weighted_f1") is not None else "n/a"]
        cells += [ci(ft, other)] if other else []
        for vs in ("base", "majority"):
            p = (ft or {}).get(f"{mode}_p_vs_{vs}")
            cells.append("n/a" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
