"""What an evaluation means, in words and examples (notebook 03 shows these; nothing here scores).

:func:`interpret` turns the table into one sentence per set (is the fine-tuned model above the
majority baseline, and does the interval say so?), :func:`label_examples` picks answers labelled
right and wrong, :func:`quiet` keeps third-party progress bars and warnings out of cell output.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path


@contextlib.contextmanager
def quiet():
    """No weight-loading bars, deprecation warnings or info logs from transformers/PEFT/datasets."""
    import transformers

    tl = transformers.utils.logging
    level = tl.get_verbosity()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    loggers = {n: logging.getLogger(n).level for n in ("transformers", "peft", "datasets", "accelerate")}
    for n in loggers:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tl.set_verbosity(level)
        tl.enable_progress_bar()
        for n, lv in loggers.items():
            logging.getLogger(n).setLevel(lv)


def _ci(r: dict, mode: str) -> str:
    v, lo, hi = (r.get(f"{mode}_weighted_f1{s}") for s in ("", "_lo", "_hi"))
    return f"{v:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None else "")


def interpret(rows: list[dict], mode: str = "official") -> list[str]:
    """One sentence per set: the best system against the majority baseline, in ``mode`` labels."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        by = {r["system"]: r for r in rows if r["set"] == name}
        if not any(f"{mode}_weighted_f1" in r for r in by.values()):
            out.append(f"{name}: no label metrics (the set defines no classes); compare text metrics only.")
            continue
        sys_name = "finetuned" if "finetuned" in by else "base"
        r, maj = by[sys_name], by.get("majority")
        line = f"{name}: {sys_name} weighted F1 {_ci(r, mode)}"
        if maj is not None:
            m = maj[f"{mode}_weighted_f1"]
            lo = r.get(f"{mode}_weighted_f1_lo")
            verdict = ("above the majority baseline and its interval excludes it" if lo is not None and lo > m else
                       "above the majority baseline, but its interval still includes it" if r[f"{mode}_weighted_f1"] > m
                       else "not above the majority baseline")
            line += f" vs majority {m:.1f}: {verdict}"
        if "base" in by and sys_name == "finetuned":
            p = r.get(f"{mode}_p_vs_base")
            line += f"; base {_ci(by['base'], mode)}" + (f", paired p = {p:.3f}" if p is not None else "")
        n_un = r.get(f"{mode}_unlabelled")
        if n_un:
            line += (f"; {n_un} of {r['n']} answers named no class"
                     + (" (scored as the default class)" if mode == "official" else " (scored as wrong)"))
        out.append(line + ".")
    return out


def label_examples(eval_dir: Path, name: str, system: str, task, mode: str = "official", n: int = 2,
                   chars: int = 180):
    """A frame of ``n`` answers labelled right and ``n`` labelled wrong (or unlabelled): gold class,
    predicted class and the start of the answer, so a reader sees what the parser saw."""
    import pandas as pd

    from phyassist.evaluate.generate import read_outputs_csv
    from phyassist.evaluate.labels import label_set

    goldens, generated = read_outputs_csv(Path(eval_dir) / system / f"{name}.csv")
    lab = label_set(goldens, generated, task, mode)
    rows = [{"row": i, "gold": g, "predicted": p, "right": g == p,
             "answer": " ".join(generated[i].split())[:chars]} for i, g, p in zip(lab.rows, lab.gold, lab.pred)]
    right = [r for r in rows if r["right"]][:n]
    wrong = [r for r in rows if not r["right"]][:n]
    return pd.DataFrame(right + wrong, columns=["row", "gold", "predicted", "right", "answer"])
