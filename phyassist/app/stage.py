"""``python -m phyassist app --config … [--data-dir DIR] [--port N] [--host H]``: serve the
counselor assistant. The key is checked before the model loads: a wrong or missing key stops
here with a clear message and the store untouched."""

from __future__ import annotations

import argparse
import sys

from phyassist.app.crypto import KeyProblem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="database + encrypted adapters (default: app.data_dir)")
    parser.add_argument("--port", type=int, default=None, help="port (default: app.port)")
    parser.add_argument("--host", default=None, help="bind address (default: app.host = 127.0.0.1)")


def main(cfg, args: argparse.Namespace) -> int:
    from phyassist.app.service import CounselorService, open_store
    from phyassist.app.ui import launch, load_users
    from phyassist.data.records import check_run_records

    check_run_records(cfg)  # the run's adapter was trained on records for this model's chat template
    try:
        load_users(cfg.app)
        open_store(cfg, args.data_dir).close()  # key check first: fail fast, before the model loads
        svc = CounselorService.build(cfg, args.data_dir)
    except KeyProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = args.host or cfg.app.host
    port = args.port if args.port is not None else cfg.app.port
    warm = f" · warmed up in {svc.warmup_s:.1f} s" if svc.warmup_s is not None else ""
    print(f"[app] data in {svc.store.data_dir} · model {cfg.model.name}{warm} · serving on http://{host}:{port}",
          flush=True)
    try:
        launch(svc, host=host, port=port, block=True)
    finally:
        svc.close()
    return 0
