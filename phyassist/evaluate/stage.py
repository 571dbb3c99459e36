"""``python -m phyassist evaluate``: generate on the IMHI test sets with the base model and the
fine-tuned adapter (one model load, same prompts), score them, write the comparison.

Outputs under ``<out>/eval/``: ``<tag>/<SET>.csv`` (MentalLLaMA's layout, tag = base |
finetuned), ``results.json``, ``comparison.csv/.md/.png``.
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


def score_all(cfg, sets, tags: list[str]) -> list[dict]:
    """Metrics rows for every (system, set), the majority baseline included."""
    from phyassist.evaluate.generate import read_outputs_csv
    from phyassist.evaluate.scoring import majority_answers, score_set

    e = cfg.evaluate
    scorer = None
    if e.bartscore_model:
        from phyassist.evaluate.bartscore import BARTScorer

        scorer = BARTScorer(e.bartscore_model, e.bartscore_checkpoint, max_length=e.bartscore_max_length)
    rows = []
    for ts in sets:
        for tag in tags:
            goldens, generated = read_outputs_csv(eval_dir(cfg) / tag / f"{ts.name}.csv")
            rows.append({"system": tag, **score_set(ts.name, goldens, generated, e, scorer)})
        baseline = majority_answers(ts.name, ts.goldens)
        if baseline is not None:
            rows.append({"system": MAJORITY, **score_set(ts.name, ts.goldens, baseline, e, scorer)})
    return rows


def table_note(cfg) -> str:
    e = cfg.evaluate
    parts = ["weighted/micro/macro F1 and accuracy: rule-based labels (×100); "
             "majority: every answer is the label sentence of the set's most frequent gold class."]
    parts.append(f"BARTScore: {e.bartscore_model}" if e.bartscore_model else
                 "BARTScore: not computed (evaluate.bartscore_model unset; needs facebook/bart-large-cnn).")
    parts.append(f"classifier labels (clf_*): {e.classifiers}" if e.classifiers else
                 "MentalBERT classifier labels: not computed (evaluate.classifiers unset; needs Tianlin668/<set>).")
    parts.append(f"model: {cfg.model.name}; max_new_tokens={e.max_new_tokens}; "
                 f"{'sampling' if e.do_sample else 'greedy'}; max_examples={e.max_examples}.")
    return "\n".join(f"- {p}" for p in parts)


def run_evaluation(cfg, progress: bool = True) -> dict:
    """Generate, score and tabulate; returns paths and rows (also in ``results.json``)."""
    from phyassist.evaluate.results import comparison_frame, plot_comparison, save_table
    from phyassist.evaluate.testsets import load_test_sets
    from phyassist.runinfo import write_run_info

    sets = load_test_sets(cfg)  # validates every file before any model work
    write_run_info(cfg)
    tags = generate_all(cfg, sets, progress)
    rows = score_all(cfg, sets, tags)
    out = eval_dir(cfg)
    df = comparison_frame(rows)
    csv_path, md_path = save_table(df, out, note=table_note(cfg))
    result = {"rows": rows, "table_csv": str(csv_path), "table_md": str(md_path), "systems": tags}
    if cfg.evaluate.plot:
        result["plot"] = str(plot_comparison(df, out / "comparison.png", f"{cfg.name}: {cfg.model.name}"))
    atomic_write_json(out / "results.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(cfg, args: argparse.Namespace) -> int:
    res = run_evaluation(cfg, progress=not getattr(args, "no_progress", False))
    print(Path(res["table_md"]).read_text(encoding="utf-8"))
    print(f"[evaluate] table: {res['table_csv']}  plot: {res.get('plot', '-')}")
    return 0
