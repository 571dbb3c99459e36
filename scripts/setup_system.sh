#!/usr/bin/env bash
# System packages the tests need beyond Python (Debian): installed only when missing, by
# `make test`, `make screenshots` and .ci/run (never by `make setup` or `make run`: they need no root).
# Stages that need one add it here; every step is a no-op when already satisfied.
#   chromium   - the real browser the app's Playwright tests drive (/usr/bin/chromium);
#                Playwright's own browser download needs internet, Debian's package does not.
#   postgresql - initdb/pg_ctl/postgres for the app's PostgreSQL storage test (a throwaway
#                cluster on 127.0.0.1 in a temp dir; no system service is started).
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup_system: installing ${need[*]}" >&2
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
