"""``python -m phyassist evaluate``: generate on the IMHI test sets with the base model and the
fine-tuned adapter (one model load, same prompts), score them, write the comparison.

Outputs under ``<out>/eval/``: ``<tag>/<SET>.csv`` (MentalLLaMA's layout, tag = base |
finetuned), ``results.json``, ``comparison.csv/.md/.png``, ``confusion/`` (JSON + CSV per system, set
and label mode) and ``confusion_<mode>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from phyassist.io import atomic_write_json

BASE, FINETUNED, MAJORITY = "base", "finetuned", "majority"


def eval_dir(cfg) -> Path:
    return cfg.out / "eval"


def adapter_dir(cfg) -> Path | None:
    """``evaluate.adapter_dir`` (must exist), else ``<out>/adapter`` when it was trained."""
    if cfg.evaluate.adapter_dir:
        p = Path(cfg.evaluate.adapter_dir).expanduser()
        if not (p / "adapter_config.json").exists():
            raise FileNotFoundError(f"{p}: evaluate.adapter_dir has no adapter_config.json")
        return p
    p = cfg.out / "adapter"
    return p if (p / "adapter_config.json").exists() else None


def inference_config(cfg):
    """The run config with ``evaluate.load_in_4bit`` applied to the model section."""
    if cfg.evaluate.load_in_4bit is None or cfg.evaluate.load_in_4bit == cfg.model.quant.load_in_4bit:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.quant.load_in_4bit = cfg.evaluate.load_in_4bit
    return cfg


def load_for_eval(cfg, adapter: Path | None):
    """(model, tokenizer): the kit's inference loader, ``evaluate.load_in_4bit`` applied."""
    from phyassist.models.inference import load_for_inference

    return load_for_inference(inference_config(cfg), adapter)


def generation_settings(cfg) -> dict:
    e = cfg.evaluate
    return dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, chunk_batches=e.chunk_batches,
                do_sample=e.do_sample, temperature=e.temperature, top_p=e.top_p,
                repetition_penalty=e.repetition_penalty, num_beams=e.num_beams)


def generate_all(cfg, sets, progress: bool = True) -> list[str]:
    """Write ``<out>/eval/<tag>/<SET>.csv`` for every system and set; return the tags."""
    from phyassist.evaluate.generate import generate_set, generation_kwargs

    adapter = adapter_dir(cfg)
    tags = ([FINETUNED] if adapter else []) + ([BASE] if cfg.evaluate.evaluate_base or not adapter else [])
    model, tok = load_for_eval(cfg, adapter)
    settings = generation_settings(cfg)
    gen_kw = generation_kwargs(tok, settings.pop("max_new_tokens"), settings.pop("do_sample"),
                               settings.pop("temperature"), settings.pop("top_p"),
                               settings.pop("repetition_penalty"), settings.pop("num_beams"))
    system = cfg.evaluate.system_prompt or cfg.data.system_prompt
    for tag in tags:
        off = model.disable_adapter() if (tag == BASE and adapter) else contextlib.nullcontext()
        with off:
            for ts in sets:
                generate_set(model, tok, ts.queries, ts.goldens, eval_dir(cfg) / tag / f"{ts.name}.csv",
                             system=system, progress=progress, **settings, **gen_kw)
    return tags


def bartscore_variant(e) -> str:
    """Which BARTScore produced a table's numbers (MentalLLaMA used bart-large-cnn + ParaBank2)."""
    if not e.bartscore_model:
        return "not computed (evaluate.bartscore_model unset)"
    if e.bartscore_checkpoint:
        return f"{e.bartscore_model} + ParaBank2 weights {Path(e.bartscore_checkpoint).name} (MentalLLaMA's variant)"
    return f"{e.bartscore_model} without the ParaBank2 weights (not MentalLLaMA's variant: lower scores)"


def bartscore_checkpoint(cfg) -> str | None:
    """``evaluate.bartscore_checkpoint`` as a path; fetched first when missing and ``data.download``."""
    ck = cfg.evaluate.bartscore_checkpoint
    if not ck:
        return None
    from phyassist.paths import REPO_ROOT

    p = Path(ck).expanduser()
    p = p if p.is_absolute() or p.exists() else REPO_ROOT / p
    if not p.exists() and cfg.data.download:
        from phyassist.evaluate.bartscore import download_parabank_checkpoint

        download_parabank_checkpoint(p)
    if not p.exists():
        raise FileNotFoundError(f"{p}: evaluate.bartscore_checkpoint (ParaBank2 bart_score.pth) not found; "
                                "set data.download=true to fetch it, or give its local path")
    return str(p)


def score_all(cfg, sets, tags: list[str], out: Path | None = None) -> list[dict]:
    """Metrics rows for every (system, set), the majority baseline included, with paired tests
    (fine-tuned vs base and vs majority) on the fine-tuned rows; confusion matrices under
    ``<out>/confusion/``. Rows keep ``_labels`` (dropped before tabulating)."""
    from phyassist.evaluate.generate import read_outputs_csv
    from phyassist.evaluate.scoring import majority_answers, score_set

    e = cfg.evaluate
    scorer = None
    if e.bartscore_model:
        from phyassist.evaluate.bartscore import BARTScorer

        scorer = BARTScorer(e.bartscore_model, bartscore_checkpoint(cfg), max_length=e.bartscore_max_length)
    rows = []
    for ts in sets:
        set_rows = {}
        for tag in tags:
            goldens, generated = read_outputs_csv(eval_dir(cfg) / tag / f"{ts.name}.csv")
            set_rows[tag] = {"system": tag, **score_set(ts.name, goldens, generated, e, scorer, ts.task,
                                                        ts.classifier)}
        baseline = majority_answers(ts.task, ts.goldens)
        if baseline is not None:
            set_rows[MAJORITY] = {"system": MAJORITY, **score_set(ts.name, ts.goldens, baseline, e, scorer,
                                                                  ts.task, ts.classifier)}
        add_paired_tests(set_rows, ts.task, e)
        rows += list(set_rows.values())
    if out is not None:
        save_confusions(rows, out / "confusion")
    return rows


def add_paired_tests(set_rows: dict, task, e) -> None:
    """``<mode>_p_vs_base`` / ``<mode>_p_vs_majority`` on the fine-tuned row: paired bootstrap
    p-values (share of resamples where fine-tuned's weighted F1 is not higher)."""
    from phyassist.evaluate.stats import paired_bootstrap

    ft = set_rows.get(FINETUNED)
    if task is None or ft is None or not e.bootstrap_resamples:
        return
    for other in (BASE, MAJORITY):
        if other not in set_rows:
            continue
        for mode in e.label_modes:
            a, b = set_rows[other]["_labels"][mode], ft["_labels"][mode]
            if a["gold"] != b["gold"]:  # a pair's gold dropped differently: not the same answers
                continue
            res = paired_bootstrap(b["gold"], a["pred"], b["pred"], task.classes,
                                   resamples=e.bootstrap_resamples, seed=e.bootstrap_seed)
            ft[f"{mode}_p_vs_{other}"] = res["p"]
            ft[f"{mode}_diff_vs_{other}"] = res["difference"]


def save_confusions(rows: list[dict], folder: Path) -> list[Path]:
    """``<system>_<set>_<mode>.json`` and ``.csv`` per labelled row."""
    import csv
    import io

    from phyassist.io import atomic_write_text

    paths = []
    for r in rows:
        for mode, lab in (r.get("_labels") or {}).items():
            cm = lab["confusion"]
            stem = folder / f"{r['system']}_{r['set']}_{mode}"
            paths.append(atomic_write_json(stem.with_suffix(".json"), {"set": r["set"], "system": r["system"],
                                                                        "mode": mode, "rows": "gold",
                                                                        "columns": "predicted", **cm}))
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["gold \\ predicted", *cm["labels"]])
            for name, counts in zip(cm["labels"], cm["matrix"]):
                w.writerow([name, *counts])
            atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    return paths


def public_rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def table_note(cfg) -> str:
    e = cfg.evaluate
    modes = ", ".join(e.label_modes)
    parts = [f"label metrics (×100) in {modes} mode: official = MentalLLaMA's rules (IMHI.py for answers, "
             "label_inference.py for gold, the kit's SAD/CAMS gold phrases added; an answer naming no class "
             "gets the set's default class), robust = the kit's parser (an unlabelled answer is wrong); "
             "docs/evaluate.md lists every difference.",
             f"[lo, hi]: 95 % percentile bootstrap intervals, {e.bootstrap_resamples} resamples, seed "
             f"{e.bootstrap_seed}; p vs base / majority: paired bootstrap, share of resamples where "
             "fine-tuned's weighted F1 is not higher.",
             "micro F1 = accuracy (MentalLLaMA's definition: every answer counted).",
             "majority: every answer is the label sentence of the set's most frequent gold class."]
    parts.append(f"BARTScore: {bartscore_variant(e)}.")
    parts.append(f"classifier labels (clf_*): {e.classifiers}" if e.classifiers else
                 "MentalBERT classifier labels: not computed (evaluate.classifiers unset; needs Tianlin668/<set>).")
    parts.append(f"model: {cfg.model.name}; max_new_tokens={e.max_new_tokens}; "
                 f"{'sampling' if e.do_sample else 'greedy'}; max_examples={e.max_examples}.")
    return "\n".join(f"- {p}" for p in parts)


def score_and_tabulate(cfg, sets, tags: list[str], title: str | None = None) -> dict:
    """Score existing outputs under ``<out>/eval/<tag>/`` and write table, plots and results.json."""
    from phyassist.evaluate.results import comparison_frame, plot_comparison, plot_confusions, save_table

    out = eval_dir(cfg)
    rows = score_all(cfg, sets, tags, out)
    notices = {r["set"]: r["notice"] for r in rows if r.get("notice")}
    for name, msg in notices.items():
        print(f"[evaluate] {name}: {msg}")
    df = comparison_frame(public_rows(rows))
    csv_path, md_path = save_table(df, out, note=table_note(cfg))
    result = {"rows": public_rows(rows), "table_csv": str(csv_path), "table_md": str(md_path), "systems": tags,
              "label_modes": list(cfg.evaluate.label_modes), "bartscore": bartscore_variant(cfg.evaluate),
              "notices": notices, "confusion_dir": str(out / "confusion")}
    if cfg.evaluate.plot:
        result["plot"] = str(plot_comparison(df, out / "comparison.png", title or f"{cfg.name}: {cfg.model.name}"))
        result["confusion_plots"] = [str(p) for p in plot_confusions(rows, out)]
    atomic_write_json(out / "results.json", result)
    return result


def run_evaluation(cfg, progress: bool = True) -> dict:
    """Generate, score and tabulate; returns paths and rows (also in ``results.json``)."""
    from phyassist.data.records import check_run_records
    from phyassist.evaluate.testsets import load_test_sets
    from phyassist.runinfo import write_run_info

    sets = load_test_sets(cfg)  # validates every file before any model work
    check_run_records(cfg)  # the run's adapter was trained on records for this model's chat template
    write_run_info(cfg)
    tags = generate_all(cfg, sets, progress)
    return score_and_tabulate(cfg, sets, tags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(cfg, args: argparse.Namespace) -> int:
    res = run_evaluation(cfg, progress=not getattr(args, "no_progress", False))
    print(Path(res["table_md"]).read_text(encoding="utf-8"))
    print(f"[evaluate] table: {res['table_csv']}  plot: {res.get('plot', '-')}")
    return 0
