"""``python -m phyassist recipe --config configs/recipes/<recipe>.yaml [--steps data sft ...]``

Runs a recipe's steps in order (``recipe.steps``, or ``--steps``): data -> sft -> (reward -> rl)
-> predict. Each step reads what the earlier ones wrote under the run's output folder, so steps
can run one at a time (e.g. reward on another machine) and a killed step resumes.
"""

from __future__ import annotations

import argparse
import json
import time

from phyassist.runinfo import write_run_info

STEPS = ("data", "sft", "reward", "rl", "predict")


def reward_adapter_path(cfg):
    from pathlib import Path

    from phyassist.recipes.common import step_dir

    return Path(cfg.recipe.reward_adapter) if cfg.recipe.reward_adapter else step_dir(cfg, "reward") / "adapter"


def run_step(cfg, step: str):
    """One step; returns what it produced (a summary dict or an adapter folder)."""
    from phyassist.recipes import data

    if step == "data":
        return data.prepare(cfg)["counts"]
    if step == "sft":
        from phyassist.recipes.sft import train_sft

        return train_sft(cfg, data.read_split(cfg, "train"), data.read_split(cfg, "val"))
    if step == "reward":
        from phyassist.recipes.preference import preference_splits
        from phyassist.recipes.reward import train_reward
        from phyassist.recipes.reward_eval import evaluate_reward

        pairs = preference_splits(cfg)
        adapter = train_reward(cfg, pairs["train"], pairs["val"])
        return {"adapter": str(adapter), "held_out": evaluate_reward(cfg, adapter, pairs["held_out"]).get("all")}
    if step == "rl":
        from phyassist.recipes.rl import train_rl
        from phyassist.recipes.sft import sft_adapter_path

        return train_rl(cfg, data.read_split(cfg, "train"), sft_adapter_path(cfg), reward_adapter_path(cfg))
    if step == "predict":
        return predict(cfg)
    raise ValueError(f"unknown recipe step {step!r} (steps: {', '.join(STEPS)})")


def predict(cfg) -> dict:
    from phyassist.recipes import data
    from phyassist.recipes.common import step_dir
    from phyassist.recipes.predict import evaluate_soulchat, predict_covid
    from phyassist.recipes.sft import sft_adapter_path

    test = data.read_split(cfg, "test")
    if cfg.recipe.kind == "covid":
        return predict_covid(cfg, test, sft_adapter_path(cfg), step_dir(cfg, "rl") / "adapter",
                             reward_adapter_path(cfg))
    return evaluate_soulchat(cfg, test, sft_adapter_path(cfg))


def run(cfg, steps: list[str] | None = None) -> dict:
    if cfg.recipe.kind is None:
        raise ValueError("recipe.kind is not set: use a config from configs/recipes/")
    write_run_info(cfg)
    results = {}
    for step in steps or cfg.recipe.steps:
        print(f"[recipe {cfg.recipe.kind}] {step} ...", flush=True)
        start = time.perf_counter()
        results[step] = run_step(cfg, step)
        print(f"[recipe {cfg.recipe.kind}] {step} done in {time.perf_counter() - start:.1f} s: {results[step]}",
              flush=True)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=None,
                        help="steps to run, in order (default: recipe.steps of the config)")


def main(cfg, args: argparse.Namespace) -> int:
    results = run(cfg, args.steps)
    print(json.dumps({k: (str(v) if not isinstance(v, dict) else v) for k, v in results.items()},
                     indent=2, ensure_ascii=False, default=str))
    return 0
