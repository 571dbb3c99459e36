"""``python -m phyassist <stage> --config configs/<profile>.yaml [--output-dir DIR] [key=value ...]``

Each stage lives in its own module exposing ``main(cfg, args) -> int`` and, optionally,
``add_arguments(parser)`` for its own flags. The CLI imports only the stage it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from phyassist.config import ConfigError, load_config

# stage -> (module, one-line help). ``run`` executes the notebooks of every stage in order.
STAGES: dict[str, tuple[str, str]] = {
    "data": ("phyassist.data.stage", "clean and format the training data"),
    "train": ("phyassist.train.stage", "QLoRA fine-tuning with TRL's SFTTrainer"),
    "evaluate": ("phyassist.evaluate.stage", "generate on the test sets and score base vs fine-tuned"),
    "score": ("phyassist.evaluate.score", "score a file of prediction/reference records"),
    "publish": ("phyassist.publish.stage", "package the adapter and model card; push to the Hub"),
    "app": ("phyassist.app.stage", "the counselor assistant (Gradio)"),
    "chat": ("phyassist.chat", "streaming command-line chat with a model and its adapters"),
    "recipe": ("phyassist.recipes.stage", "template recipes: SoulChat LoRA; COVID SFT -> reward model -> RL"),
    "models": ("phyassist.models.registry", "list the model registry"),
    "run": ("phyassist.pipeline", "every stage in order, through the notebooks (the main job)"),
}
NEEDS_NO_CONFIG = {"models", "score"}


def _stage_module(stage: str):
    module_name = STAGES[stage][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def build_parser(stage: str | None = None, module=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m phyassist {stage or '<stage>'}",
                                     description=STAGES[stage][1] if stage else __doc__)
    if stage is None:
        parser.add_argument("stage", choices=list(STAGES), help="; ".join(f"{k}: {v[1]}" for k, v in STAGES.items()))
        return parser
    parser.add_argument("--config", "-c", default=None if stage in NEEDS_NO_CONFIG else "smoke",
                        help="YAML file or profile name in configs/ (default: smoke)")
    parser.add_argument("--output-dir", "-o", default=None, help="override the run's output folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.max_steps=10 model.name=tiny-mixtral")
    if module is not None and hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        build_parser().parse_args(argv[:1] or ["--help"])
        return 2
    stage, rest = argv[0], argv[1:]
    module = _stage_module(stage)
    if module is None:
        print(f"stage '{stage}' is not implemented yet in this version of the kit.", file=sys.stderr)
        return 2
    args = build_parser(stage, module).parse_args(rest)
    cfg = None
    if args.config is not None:
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        try:
            cfg = load_config(args.config, overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        return int(module.main(cfg, args) or 0)
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
