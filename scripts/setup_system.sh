#!/usr/bin/env bash
# System packages the tests need beyond Python (Debian): installed only when missing.
# Stages that need one add it here; every step is a no-op when already satisfied.
set -euo pipefail
need=()
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}"
fi
