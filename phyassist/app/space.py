"""Hugging Face Space entry point (the study's §2.8). A Space's ``app.py`` is just::

    from phyassist.app.space import main
    main()

Configure it with Space secrets, never in the repository: ``PHYASSIST_APP_KEY`` (base64 key;
required: a Space's disk is not private), ``PHYASSIST_APP_USERS`` ('alice:pw,…'; required, a
Space is public), optionally ``PHYASSIST_CONFIG`` (profile or YAML, default ``smoke``) and
``PHYASSIST_APP_DATA`` (default ``/data/phyassist`` = the Space's persistent storage when enabled).
"""

from __future__ import annotations

import os

from phyassist.app.crypto import KeyProblem


def space_config(environ=os.environ):
    """The run config for a Space: serves on 0.0.0.0:7860 (what Spaces expect)."""
    from phyassist.config import load_config

    profile = environ.get("PHYASSIST_CONFIG", "smoke")
    data = environ.get("PHYASSIST_APP_DATA", "/data/phyassist")
    return load_config(profile, [f"app.host=0.0.0.0", "app.port=7860", f"app.data_dir={data}"])


def check_space_secrets(cfg, environ=os.environ) -> None:
    """A Space is reachable from the internet: refuse to start without a key secret and logins."""
    missing = [v for v in (cfg.app.key_env, cfg.app.users_env) if not environ.get(v)]
    if missing:
        raise KeyProblem(f"set the Space secret(s) {', '.join(missing)} (Settings → Variables and secrets)")


def main(block: bool = True):
    from phyassist.app.service import CounselorService
    from phyassist.app.ui import launch

    cfg = space_config()
    check_space_secrets(cfg)
    svc = CounselorService.build(cfg)
    return launch(svc, block=block)
