"""``python -m phyassist train --config <profile> [--dry-run]``: fine-tune, or project memory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, print trainable parameters and the memory "
                             "projection per GPU; loads no weights and needs no GPU")


def main(cfg, args) -> int:
    if getattr(args, "dry_run", False):
        from phyassist.train.dryrun import dry_run

        proj, text = dry_run(cfg)
        print(text)
        return 0 if proj.fits() in (True, None) else 3
    from phyassist.runinfo import write_run_info
    from phyassist.train.trainer import is_main_process, train

    if is_main_process():  # under `accelerate launch` every process runs this; one writes
        write_run_info(cfg)
    adapter = train(cfg)
    if is_main_process():
        print(f"adapter written to {adapter}")
    return 0
