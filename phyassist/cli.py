"""PhyAssist: fine-tune a language model into a psychological counselor's assistant, evaluate it on
the IMHI test sets, publish it and serve it to counselors.

Every stage reads one run configuration (a YAML file, or a profile name from configs/: smoke runs
on a CPU in minutes, paper is the study) and writes under the run's output folder, runs/<name>/
unless --output-dir says otherwise. Any config key can be set on the command line as key=value.

Start with:
  python -m phyassist run                      every stage in order, through the notebooks (smoke)
  python -m phyassist data --help              one stage: what it does, an example, what it writes
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from phyassist.config import ConfigError, load_config


@dataclass(frozen=True)
class Stage:
    module: str  # exposes main(cfg, args) -> int and, optionally, add_arguments(parser)
    summary: str
    example: str
    writes: str  # the output layout, for --help
    uses_config: bool | str = True  # "optional": config flags, read only when --config is given


STAGES: dict[str, Stage] = {
    "run": Stage("phyassist.pipeline", "every stage in order, through the notebooks (the main job)",
                 "python -m phyassist run --config smoke",
                 "<out>/notebooks/NN_*.ipynb   the executed notebooks (with outputs and any traceback)\n"
                 "and everything the data, train, evaluate and publish stages write (see their --help)"),
    "data": Stage("phyassist.data.stage", "clean and format the training data through the model's chat template",
                  "python -m phyassist data --config smoke data.sources.0.n_rows=50",
                  "<out>/data/train.jsonl, val.jsonl      records (question, gold answer, prompt, completion)\n"
                  "<out>/data/train.csv, val.csv          the study's single text column\n"
                  "<out>/data/records.json                the model and chat template they were formatted for\n"
                  "<out>/data/cleaning_report.md/.json    every removal counted; removed.jsonl lists each row\n"
                  "<out>/data/token_lengths.png           formatted lengths per source"),
    "train": Stage("phyassist.train.stage", "QLoRA fine-tuning with TRL's SFTTrainer (or --dry-run: will it fit?)",
                   "python -m phyassist train --config smoke train.max_steps=10",
                   "<out>/adapter/                         the LoRA adapter (PEFT) with its tokenizer\n"
                   "<out>/checkpoints/checkpoint-N/        resumable checkpoints; trainer_state.json\n"
                   "<out>/images/train_loss.png, train_lr.png\n"
                   "<out>/run_summary.md/.json             config, final metrics, plots (readable without wandb)\n"
                   "<out>/wandb/                           the wandb run (offline: `wandb sync` uploads it)"),
    "evaluate": Stage("phyassist.evaluate.stage", "generate on the IMHI test sets and score base vs fine-tuned",
                      "python -m phyassist evaluate --config smoke",
                      "<out>/eval/<base|finetuned>/<SET>.csv  generations, MentalLLaMA's layout\n"
                      "<out>/eval/comparison.md/.csv/.png     the comparison table; results.json"),
    "score": Stage("phyassist.evaluate.score", "score a file of prediction/reference records",
                   "python -m phyassist score --input preds.jsonl --output scores.json --task DR",
                   "the --output JSON: every metric that applies; with --config ... --answers: <out>/eval/ "
                   "(comparison table with intervals, results.json)", uses_config="optional"),
    "publish": Stage("phyassist.publish.stage", "package the adapter and model card; push to the Hub",
                     "python -m phyassist publish --config smoke --dry-run",
                     "<out>/publish/package/                 adapter, tokenizer, model card, config, eval report\n"
                     "<out>/merged/<combination>/            with --merge"),
    "app": Stage("phyassist.app.stage", "the counselor assistant (Gradio web app)",
                 "PHYASSIST_APP_USERS=alice:secret python -m phyassist app --config smoke",
                 "app.data_dir (~/.local/share/phyassist/app): the database and patients' encrypted adapters\n"
                 "app.key_file (~/.config/phyassist/app.key): the key, created on first run (0600)"),
    "chat": Stage("phyassist.chat", "streaming command-line chat with a model and its adapters",
                  "python -m phyassist chat --config smoke --adapters runs/smoke/adapter",
                  "nothing (the conversation stays in the terminal)"),
    "recipe": Stage("phyassist.recipes.stage", "template recipes: SoulChat LoRA; COVID SFT -> reward model -> RL",
                    "python -m phyassist recipe --config configs/recipes/covid-smoke.yaml",
                    "<out>/<step>/   one folder per step: data, sft, reward, rl, predict\n"
                    "<out>/images/   loss, reward and length plots"),
    "models": Stage("phyassist.models.registry", "list the models the kit knows by name",
                    "python -m phyassist models", "nothing (prints the registry)", uses_config=False),
}
LAYOUT_NOTE = "<out> is the run's output folder: output_dir of the config (runs/<name>), or --output-dir."


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phyassist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="stages:\n" + "\n".join(f"  {k:<9} {s.summary}" for k, s in STAGES.items()))
    parser.add_argument("stage", choices=list(STAGES), metavar="stage",
                        help="the stage to run (listed below); `python -m phyassist <stage> --help` for its flags")
    return parser


def build_parser(stage: str, module=None) -> argparse.ArgumentParser:
    """The parser of one stage: its own flags, and the config flags only where a config is read."""
    s = STAGES[stage]
    epilog = f"example:\n  {s.example}\n\nwrites:\n" + "\n".join(f"  {line}" for line in s.writes.splitlines())
    if s.uses_config:
        epilog += f"\n\n{LAYOUT_NOTE}"
    parser = argparse.ArgumentParser(prog=f"python -m phyassist {stage}", description=s.summary, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if s.uses_config:
        optional = s.uses_config == "optional"
        parser.add_argument("--config", "-c", default=None if optional else "smoke",
                            help="YAML file or profile name in configs/ "
                                 + ("(only with --answers)" if optional else "(default: smoke)"))
        parser.add_argument("--output-dir", "-o", default=None, help="the run's output folder (default: runs/<name>)")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="config overrides, e.g. train.max_steps=10 model.name=tiny-mixtral "
                                 "data.sources.0.path=my.csv")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="keep third-party notices (wandb banner, kernel warnings) and full tracebacks")
    if module is not None and hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser


def _check_model(cfg) -> None:
    """A model name the kit cannot load is refused here, before any stage reads data or the network."""
    from phyassist.models.registry import check_model_name, get_spec

    if get_spec(cfg.model.name) is None:
        check_model_name(cfg.model.name)


def main(argv: list[str] | None = None) -> int:
    from phyassist.console import quiet_output

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    stage, rest = argv[0], argv[1:]
    module = importlib.import_module(STAGES[stage].module)
    args = build_parser(stage, module).parse_args(rest)
    cfg = None
    if STAGES[stage].uses_config and args.config is not None:
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        try:
            cfg = load_config(args.config, overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    with quiet_output(args.verbose):
        try:
            if cfg is not None:
                _check_model(cfg)
            return int(module.main(cfg, args) or 0)
        except (FileNotFoundError, ValueError, ConfigError) as exc:
            if args.verbose:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 1
