"""``python -m phyassist app --config … [--data-dir DIR] [--port N] [--host H]``: serve the
counselor assistant. The logins, the bind address and the key are checked before the model
loads: a wrong or missing key stops here with a clear message and the store untouched.
``--verify-audit``: check the audit log's MAC chain and exit (0 intact, 1 not)."""

from __future__ import annotations

import argparse
import sys

from phyassist.app.crypto import KeyProblem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="database + encrypted adapters (default: app.data_dir)")
    parser.add_argument("--port", type=int, default=None, help="port (default: app.port)")
    parser.add_argument("--host", default=None, help="bind address (default: app.host = 127.0.0.1)")
    parser.add_argument("--verify-audit", action="store_true",
                        help="verify the audit log's MAC chain (needs the key) and exit: 0 intact, 1 not")


def main(cfg, args: argparse.Namespace) -> int:
    from phyassist.app.service import CounselorService, open_store

    if getattr(args, "verify_audit", False):
        return verify_audit(cfg, args.data_dir)
    from phyassist.app.ui import check_bind, launch, load_users
    from phyassist.data.records import check_run_records

    check_run_records(cfg)  # the run's adapter was trained on records for this model's chat template
    host = args.host or cfg.app.host
    port = args.port if args.port is not None else cfg.app.port
    try:
        check_bind(host, load_users(cfg.app), cfg.app.users_env)  # before anything loads
        open_store(cfg, args.data_dir).close()  # key check first: fail fast, before the model loads
        svc = CounselorService.build(cfg, args.data_dir)
    except (KeyProblem, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warm = f" · warmed up in {svc.warmup_s:.1f} s" if svc.warmup_s is not None else ""
    print(f"[app] data in {svc.store.data_dir} · model {cfg.model.name}{warm} · serving on http://{host}:{port}",
          flush=True)
    try:
        launch(svc, host=host, port=port, block=True)
    finally:
        svc.close()
    return 0


def verify_audit(cfg, data_dir: str | None) -> int:
    """Print the audit chain's state; 0 when intact, 1 when not, 2 when the store does not open."""
    from phyassist.app.service import open_store

    try:
        store = open_store(cfg, data_dir)
    except KeyProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = store.verify_audit()
    finally:
        store.close()
    print(report.text(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
