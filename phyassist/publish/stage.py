"""``python -m phyassist publish``: package the adapter with its card and push it to the Hub.

    publish --config C --dry-run                 build the folder, check it, list what would be uploaded
    publish --config C                           the same, then create the repo and upload (HF_TOKEN)
    publish --config C --merge A,B --weights 0.5,0.5 --combination ties [--merge-out DIR]
                                                 combine adapters into a new adapter folder
    publish --config C --export-merged DIR       a full model: the adapter merged into a 16-bit base
    publish --config C --measure-merge-loss      how lossy merging into 4-bit weights is (JSON + table)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from phyassist.config import RunConfig
from phyassist.publish.package import (EvalFiles, PublishError, adapter_dir, build_package, check_adapter,
                                       find_eval_files, human_size, list_files, package_dir, run_path)
from phyassist.publish.schema import COMBINATIONS


@dataclass
class Package:
    """A built folder and what the card was made from."""

    path: Path
    adapter: Path
    repo_id: str
    files: list[tuple[str, int]]
    metadata: dict


def default_repo_name(cfg: RunConfig) -> str:
    return f"phyassist-{cfg.name}"


def card_repo_id(cfg: RunConfig, repo_id: str | None = None) -> str:
    """The repo id the card names (the upload resolves a bare name against the token's user)."""
    rid = repo_id or cfg.publish.repo_id or default_repo_name(cfg)
    return rid if "/" in rid else f"<your-username>/{rid}"


def make_package(cfg: RunConfig, adapter: str | Path | None = None, dest: str | Path | None = None,
                 repo_id: str | None = None) -> Package:
    """Check the adapter and evaluation report, write the card, build and validate the folder."""
    from phyassist.publish.card import build_card, run_facts, validate_card
    from phyassist.publish.report import read_scores

    src = check_adapter(adapter_dir(cfg, adapter))
    evals: EvalFiles = find_eval_files(cfg)
    scores = read_scores(evals.table, cfg.publish.eval_model) if evals.table else []
    report = evals.report.read_text(encoding="utf-8") if evals.report else None
    facts = run_facts(cfg, src)
    rid = card_repo_id(cfg, repo_id)
    card_text = str(build_card(cfg, facts, scores, report, rid))
    metadata = validate_card(card_text)  # before anything is written: a bad card builds nothing
    path = build_package(cfg, adapter=src, dest=package_dir(cfg, dest), card_text=card_text,
                         base_model=facts.base_model, eval_files=evals)
    return Package(path, src, rid, list_files(path), metadata)


def print_listing(pkg: Package, title: str) -> None:
    total = sum(size for _, size in pkg.files)
    print(f"{title} ({len(pkg.files)} files, {human_size(total)}) from {pkg.path}:")
    for name, size in pkg.files:
        print(f"  {name:<40} {human_size(size):>10}")


def publish(cfg: RunConfig, *, dry_run: bool, adapter=None, dest=None, repo_id=None, private=None,
            load_back: bool | None = None, api=None) -> dict:
    """Build, check and (unless ``dry_run``) upload; return what was done.

    A real run checks the token, the network and the repo's owner first, so that the card names
    the repo it is uploaded to and nothing is built for an upload that cannot happen.
    """
    from phyassist.publish import hub

    target = None if dry_run else hub.connect(repo_id or cfg.publish.repo_id, default_repo_name(cfg), api=api)
    pkg = make_package(cfg, adapter, dest, target.repo_id if target else repo_id)
    result = {"package": str(pkg.path), "files": pkg.files, "repo_id": pkg.repo_id, "uploaded": False}
    if cfg.publish.load_back_check if load_back is None else load_back:
        from phyassist.publish.loadback import check_package

        check = check_package(cfg, pkg.adapter, pkg.path)
        print(check.summary())
        result["load_back"] = check.comparison.as_dict() | {"ok": check.ok}
        if not check.ok:
            raise PublishError(f"{pkg.path}: the built folder does not reproduce the adapter "
                               f"({check.summary()}); nothing uploaded")
    if target is None:
        print_listing(pkg, f"dry run: would upload to {pkg.repo_id}")
        return result
    private = cfg.publish.private if private is None else private
    print_listing(pkg, "uploading")
    done = hub.upload(target, pkg.path, private=private, commit_message=cfg.publish.commit_message)
    print(f"published {'privately' if private else 'publicly'}: {done['url']}")
    return result | done | {"uploaded": True}


# ---------------------------------------------------------------- merging

def merge_command(cfg: RunConfig, args: argparse.Namespace) -> int:
    from phyassist.publish.merge import merge_adapters, parse_weights

    paths = [Path(p.strip()) for p in args.merge.split(",") if p.strip()]
    weights = parse_weights(args.weights, len(paths))
    combination = args.combination or cfg.publish.merge.combination
    out = Path(args.merge_out) if args.merge_out else cfg.out / "merged" / combination
    merge_adapters(cfg, paths, out, weights, combination, args.density)
    print(f"merged {len(paths)} adapters ({combination}, weights {weights}) into {out}")
    print(f"evaluate or publish it like any adapter, e.g.: python -m phyassist publish --config ... "
          f"--adapter {out} --dry-run")
    return 0


def measure_command(cfg: RunConfig, args: argparse.Namespace) -> int:
    from phyassist.io import atomic_write_json
    from phyassist.publish.merge import measure_merge_loss

    adapter = adapter_dir(cfg, args.adapter)
    check_adapter(adapter)
    result = measure_merge_loss(cfg, adapter)
    out = run_path(cfg, None, "publish/merge_loss.json")
    atomic_write_json(out, result)
    print(f"merge loss on {result['model']} ({result['device']}, {result['prompts']} prompts):")
    print(f"  {'comparison':<38} {'max |diff|':>10} {'mean |diff|':>11} {'next-token agree':>17}")
    for name, c in result["comparisons"].items():
        print(f"  {name:<38} {c['max_abs_diff']:>10.4g} {c['mean_abs_diff']:>11.4g} "
              f"{c['next_token_agreement']:>16.1%}")
    print(f"written to {out}")
    return 0


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="build and check the folder; upload nothing")
    parser.add_argument("--adapter", help="adapter folder (default: publish.adapter_dir or <output>/adapter)")
    parser.add_argument("--package-dir", help="where the folder is built (default: <output>/publish/package)")
    parser.add_argument("--repo-id", help="Hub repo 'owner/name' or 'name' (default: publish.repo_id)")
    vis = parser.add_mutually_exclusive_group()
    vis.add_argument("--public", dest="private", action="store_false", default=None, help="create the repo public")
    vis.add_argument("--private", dest="private", action="store_true", help="create the repo private")
    parser.add_argument("--skip-load-back", action="store_true", help="skip the load-back logit check")
    merge = parser.add_argument_group("merging")
    merge.add_argument("--merge", metavar="A,B,...", help="merge these adapter folders into a new adapter")
    merge.add_argument("--weights", metavar="W1,W2,...", help="one weight per adapter (default: equal, sum 1)")
    merge.add_argument("--combination", choices=COMBINATIONS, help="PEFT combination (default: publish.merge)")
    merge.add_argument("--density", type=float, help="kept fraction for TIES/DARE/magnitude pruning")
    merge.add_argument("--merge-out", help="merged adapter folder (default: <output>/merged/<combination>)")
    merge.add_argument("--export-merged", metavar="DIR", help="write a full model: adapter merged into a 16-bit base")
    merge.add_argument("--measure-merge-loss", action="store_true",
                       help="measure logit differences of merging into 4-bit vs 16-bit weights")


def main(cfg: RunConfig, args: argparse.Namespace) -> int:
    if args.merge:
        return merge_command(cfg, args)
    if args.measure_merge_loss:
        return measure_command(cfg, args)
    if args.export_merged:
        from phyassist.publish.merge import export_merged_model

        src = check_adapter(adapter_dir(cfg, args.adapter))
        out = export_merged_model(cfg, src, Path(args.export_merged))
        print(f"full merged model written to {out}")
        return 0
    publish(cfg, dry_run=args.dry_run, adapter=args.adapter, dest=args.package_dir, repo_id=args.repo_id,
            private=args.private, load_back=False if args.skip_load_back else None)
    return 0
