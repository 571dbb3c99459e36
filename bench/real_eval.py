"""The real-data result: the embedded default (SmolLM2-135M-Instruct) fine-tuned on every released
IMHI training file plus counsel-chat (configs/real-eval.yaml), base and fine-tuned answers for all
6,057 queries of the study's five test sets, and a learning curve, in phases that each resume:

    data      the data stage, then training posts that repeat a test post through mojibake or
              spacing tricks dropped (phyassist.data.dedup.canonical); the exact mix -> data_mix.json
    train     the kit's trainer (resumes from its last checkpoint)
    finetuned answers of the merged fine-tuned model      -> answers_finetuned.jsonl.gz
    base      answers of the base model                   -> answers_base.jsonl.gz
    curve     label-only answers (first --curve-tokens tokens) of every checkpoint -> curve.json
              (weighted F1 against training records: why a small model does or does not beat the
              majority baseline)

    python bench/real_eval.py --data-dir DIR --out RUN --answers-to DIR [--deadline S] [--tiny] [k=v ...]

Answers carry no query or gold text (phyassist.evaluate.answers); score them anywhere with
``python -m phyassist score --config real-eval --answers ...`` (bench/real_eval.md). ``--deadline``:
seconds this call may use; a phase that would not fit is left for the next call. ``--tiny``: a few
records, steps and queries, to test the whole path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

T0 = time.time()
# seconds a phase needs at least on one H200 (bench/real_eval.md); used to stop before a kill
MIN_LEFT = {"train": 60, "finetuned": 60, "base": 45, "curve": 30}
TINY = ["train.max_steps=2", "train.save_steps=1", "train.per_device_train_batch_size=2", "evaluate.max_examples=3",
        "evaluate.batch_size=4", "evaluate.max_new_tokens=8", "evaluate.bootstrap_resamples=50",
        "model.dtype=float32", "model.device_map=cpu", "train.bf16=false", "train.optim=adamw_torch",
        "train.lora.r=4", "train.lora.alpha=4", "model.max_seq_length=512", "data.cleaning.max_tokens=512"]


def log(msg: str) -> None:
    print(f"[real_eval {time.time() - T0:6.1f} s] {msg}", flush=True)


def write_json(path: Path, obj) -> Path:
    from phyassist.io import atomic_write_json

    return atomic_write_json(path, obj)


def phase_data(cfg, tiny: bool) -> dict:
    """The data stage, then the canonical-key leakage filter; returns the data mix."""
    from phyassist.data.dedup import cross_duplicates
    from phyassist.data.sources import post_of
    from phyassist.data.stage import prepare
    from phyassist.evaluate.testsets import load_test_sets
    from phyassist.io import atomic_write_jsonl, read_jsonl

    data = cfg.out / "data"
    mix_path = data / "data_mix.json"
    if mix_path.exists():
        return json.loads(mix_path.read_text())
    if tiny:  # a handful of rows per source
        cfg.data.sources = [s.model_copy(update={"n_rows": 6}) for s in cfg.data.sources]
    res = prepare(cfg)
    train = read_jsonl(data / "train.jsonl")
    test_posts = [post_of(q) for ts in load_test_sets(_all_queries(cfg)) for q in ts.queries]
    hits = cross_duplicates([post_of(r["question"]) for r in train], test_posts, threshold=None)
    leaked = sorted({i for i, _, _ in hits})
    if leaked:
        atomic_write_jsonl(data / "train.jsonl", [r for i, r in enumerate(train) if i not in set(leaked)])
    report = res["report"]
    by_source = report["splits"]["by_source"]
    for i in leaked:
        by_source[train[i]["source"]]["train"] -= 1
    mix = {"config": cfg.name, "sources": [s.model_dump(exclude_none=True) for s in cfg.data.sources],
           "files": {k: v.get("file") for k, v in report.get("sources", {}).items()},
           "records": {"train": len(train) - len(leaked), "val": res["val"]}, "by_source": by_source,
           "removed_by_rule": report.get("removed", report.get("counts")),
           "leakage_filter": {"rule": "training post == a test post after ftfy + case/space/punctuation "
                                      "folding (phyassist.data.dedup.canonical)",
                              "removed": len(leaked),
                              "by_source": {s: sum(train[i]["source"] == s for i in leaked)
                                            for s in {train[i]["source"] for i in leaked}}},
           "seed": cfg.seed}
    write_json(mix_path, mix)
    log(f"data: {mix['records']['train']} train / {mix['records']['val']} val records; "
        f"{len(leaked)} dropped as hidden test repeats")
    return mix


def _all_queries(cfg):
    """The evaluate config without max_examples (leakage is checked against every test query)."""
    c = cfg.model_copy(deep=True)
    c.evaluate.max_examples = None
    return c


def phase_train(cfg) -> float | None:
    from phyassist.train.trainer import train

    if (cfg.out / "adapter" / "adapter_config.json").exists():
        return None
    t = time.time()
    train(cfg)
    return round(time.time() - t, 1)


def _generate(cfg, model, tok, sets, tag: str, folder: Path, max_new_tokens: int | None = None) -> None:
    from phyassist.evaluate.generate import generate_set, generation_kwargs
    from phyassist.evaluate.stage import generation_settings

    settings = generation_settings(cfg)
    new = max_new_tokens or settings.pop("max_new_tokens")
    settings.pop("max_new_tokens", None)
    kw = generation_kwargs(tok, new, settings.pop("do_sample"), settings.pop("temperature"), settings.pop("top_p"),
                           settings.pop("repetition_penalty"), settings.pop("num_beams"))
    system = cfg.evaluate.system_prompt or cfg.data.system_prompt
    for ts in sets:
        generate_set(model, tok, ts.queries, ts.goldens, folder / tag / f"{ts.name}.csv", system=system,
                     progress=False, **settings, **kw)
        log(f"{tag}: {ts.name} done ({len(ts.queries)} answers)")


def load_merged(cfg, adapter: Path | None):
    """The model with ``adapter`` merged into its weights (generation at the base model's speed)."""
    from phyassist.evaluate.stage import load_for_eval

    model, tok = load_for_eval(cfg, adapter)
    if adapter is not None:
        model = model.merge_and_unload().eval()
    return model, tok


def phase_answers(cfg, sets, tag: str, adapter: Path | None, answers_to: Path) -> float | None:
    from phyassist.evaluate.answers import answers_path, export_answers
    from phyassist.evaluate.stage import eval_dir

    if answers_path(answers_to, tag).exists():
        return None
    t = time.time()
    model, tok = load_merged(cfg, adapter)
    _generate(cfg, model, tok, sets, tag, eval_dir(cfg))
    export_answers(eval_dir(cfg), sets, [tag], answers_to)
    del model
    return round(time.time() - t, 1)


def checkpoints(cfg) -> list[tuple[int, Path]]:
    ck = sorted(((int(p.name.split("-")[1]), p) for p in (cfg.out / "checkpoints").glob("checkpoint-*")
                 if (p / "adapter_config.json").exists()), key=lambda x: x[0])
    return ck


def phase_curve(cfg, sets, tokens: int, deadline: float) -> dict:
    """Weighted F1 (official, robust) of label-only answers at every checkpoint and of the base."""
    from phyassist.evaluate.generate import read_outputs_csv
    from phyassist.evaluate.labels import label_metrics, label_set

    folder = cfg.out / "curve"
    path = folder / "curve.json"
    curve = json.loads(path.read_text()) if path.exists() else {"tokens": tokens, "points": {}}
    batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    if "majority" not in curve:
        from phyassist.evaluate.scoring import majority_answers

        curve["majority"] = {}
        for ts in sets:
            base = majority_answers(ts.task, ts.goldens)
            curve["majority"][ts.name] = {}
            for mode in cfg.evaluate.label_modes:
                lab = label_set(ts.goldens, base, ts.task, mode)
                curve["majority"][ts.name][mode] = label_metrics(lab.gold, lab.pred, ts.task)["weighted_f1"]
    for step, adapter in [(0, None)] + checkpoints(cfg):
        if str(step) in curve["points"]:
            continue
        if time.time() + MIN_LEFT["curve"] > deadline:
            log("curve: out of time, the next call continues")
            break
        model, tok = load_merged(cfg, adapter)
        _generate(cfg, model, tok, sets, f"step{step}", folder, max_new_tokens=tokens)
        point = {"step": step, "records": step * batch, "sets": {}}
        for ts in sets:
            goldens, generated = read_outputs_csv(folder / f"step{step}" / f"{ts.name}.csv")
            point["sets"][ts.name] = {}
            for mode in cfg.evaluate.label_modes:
                lab = label_set(goldens, generated, ts.task, mode)
                m = label_metrics(lab.gold, lab.pred, ts.task, lab.unlabelled)
                point["sets"][ts.name][mode] = {k: m[k] for k in ("weighted_f1", "accuracy", "unlabelled")}
        curve["points"][str(step)] = point
        write_json(path, curve)
        log(f"curve: step {step} scored")
        del model
    return curve


def copy_meta(cfg, answers_to: Path) -> None:
    """The data mix, cleaning report and training log beside the answers (no third-party text)."""
    for src in (cfg.out / "data" / "data_mix.json", cfg.out / "data" / "cleaning_report.md",
                cfg.out / "curve" / "curve.json"):
        if src.exists():
            shutil.copy(src, answers_to / src.name)
    state = cfg.out / "adapter" / "trainer_state.json"
    if not state.exists():
        ck = checkpoints(cfg)
        state = ck[-1][1] / "trainer_state.json" if ck else state
    if state.exists():
        log_history = json.loads(state.read_text()).get("log_history", [])
        write_json(answers_to / "train_log.json", log_history)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="real-eval")
    ap.add_argument("--data-dir", required=True, help="folder with MentalLLaMA/ and counsel-chat/")
    ap.add_argument("--test-dir", default=None,
                    help="IMHI test_instruction folder (default <data-dir>/MentalLLaMA/test_data/test_instruction)")
    ap.add_argument("--out", required=True, help="run folder (resumable: rerun with the same folder)")
    ap.add_argument("--answers-to", required=True, help="where answers and the data mix are written")
    ap.add_argument("--deadline", type=float, default=None, help="seconds this call may use")
    ap.add_argument("--curve-tokens", type=int, default=24, help="new tokens of the learning curve's answers")
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a few records, 2 steps, 3 queries per set (CPU test)")
    ap.add_argument("--plot-curve", metavar="CURVE_JSON", default=None,
                    help="only plot a curve.json (next to it, curve.png) and exit")
    ap.add_argument("--readme-table", metavar="RESULTS_JSON", default=None,
                    help="only print the README's results table from a rescoring's results.json and exit")
    ap.add_argument("overrides", nargs="*")
    if argv is None and "--readme-table" in sys.argv:  # README lines from a rescoring's results.json
        from phyassist.evaluate.results import headline_table

        print(headline_table(json.loads(Path(sys.argv[sys.argv.index("--readme-table") + 1]).read_text())["rows"]))
        return 0
    if argv is None and "--plot-curve" in sys.argv:
        a = sys.argv[sys.argv.index("--plot-curve") + 1]
        from phyassist.evaluate.results import plot_curve

        print(plot_curve(json.loads(Path(a).read_text()), Path(a).with_suffix(".png")))
        return 0
    args = ap.parse_args(argv)

    import signal

    import torch

    from phyassist.config import load_config

    def stop(signum, frame):  # `timeout` sends SIGTERM: leave through `finally`, so the meta is saved
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, stop)
    from phyassist.evaluate.testsets import IMHI_TEST_SUBDIR, load_test_sets

    test_dir = args.test_dir or str(Path(args.data_dir) / IMHI_TEST_SUBDIR)
    over = [f"output_dir={args.out}", f"data.data_dir={args.data_dir}", f"evaluate.test_dir={test_dir}",
            f"data.test_dir={test_dir}"] + (TINY if args.tiny else []) + list(args.overrides)
    cfg = load_config(args.config, over)
    deadline = T0 + args.deadline if args.deadline else float("inf")
    answers_to = Path(args.answers_to)
    answers_to.mkdir(parents=True, exist_ok=True)
    meta_path = answers_to / "real_eval_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"calls": []}
    call = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "overrides": over,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "timings_s": {}}
    meta["calls"].append(call)
    sets = load_test_sets(cfg)
    log(f"{sum(len(s.queries) for s in sets)} test queries in {len(sets)} sets; device {call['device']}")

    def save():
        call["timings_s"]["total"] = round(time.time() - T0, 1)
        write_json(meta_path, meta)
        copy_meta(cfg, answers_to)

    try:
        phase_data(cfg, args.tiny)
        call["timings_s"]["data"] = round(time.time() - T0, 1)
        save()
        from phyassist.evaluate.answers import answers_path

        done = {"train": (cfg.out / "adapter" / "adapter_config.json").exists(),
                "finetuned": answers_path(answers_to, "finetuned").exists(),
                "base": answers_path(answers_to, "base").exists()}
        for phase in ("train", "finetuned", "base"):
            if not done[phase] and time.time() + MIN_LEFT[phase] > deadline:
                log(f"{phase}: out of time, the next call continues")
                save()
                return 3
            if phase == "train":
                took = phase_train(cfg)
            else:
                adapter = cfg.out / "adapter" if phase == "finetuned" else None
                took = phase_answers(cfg, sets, phase, adapter, answers_to)
            if took is not None:
                call["timings_s"][phase] = took
                log(f"{phase}: {took} s")
            save()
        if not args.no_curve:
            curve = phase_curve(cfg, sets, args.curve_tokens, deadline)
            done = len(curve["points"]) == len(checkpoints(cfg)) + 1
            save()
            if not done:
                return 3
    finally:
        save()
    log("all phases done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
