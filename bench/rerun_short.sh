#!/usr/bin/env bash
# Device side: the training and generation benchmarks' short variants, to check after a refactor that
# behaviour and speed are unchanged (compare with bench/finetune_mixtral.json, bench/trainer_gpu.json,
# bench/generation_throughput.json). Needs the folder bench/wheels.sh builds (.whl/: wheels + tokenizers; carried
# with `run`, or copied elsewhere and named by WHEELS). The training step is also timed with a skewed router
# (+skew1.2: a trained Mixtral's uneven expert load, bench/router_skew.py).
#   bash bench/rerun_short.sh            results under $OUT/{finetune,trainer,generation}
set -uo pipefail
WHEELS=${WHEELS:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
mkdir -p "$OUT/finetune" "$OUT/trainer" "$OUT/generation"
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv
# 1. one training step per path (module level): the paper profile's, the single-gpu one's, and plain
P=fused-cattn-bf16lora+flat; S=fused-cnockpt-bf16lora+flat+perexpert+keepw8
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 bench/finetune_mixtral.py --out "$OUT/finetune" \
  --steps 6 --warmup 2 --halves '' --profile '' --variants plain,$P,$S,$S+skew1.2 2>&1 | grep -v -i warn | tee "$OUT/finetune/log.txt"
# 2. through the kit's trainer: configs/paper.yaml's recipe and configs/single-gpu.yaml's
python3 bench/trainer_gpu.py --tokenizer "$WHEELS/mistral-v1-tokenizer" --steps 4 --skip 2 \
  --recipes plain,flat-grouped,fast --out "$OUT/trainer" 2>&1 | grep -v -i warn | tee "$OUT/trainer/log.txt"
# 3. batched generation against the per-example loop (IMHI sample queries)
python3 bench/generation_throughput.py --device cuda --dtype bfloat16 --tokenizer "$WHEELS/smollm2-tokenizer" \
  --test-dir data/sample/MentalLLaMA/test_data/test_instruction --n-prompts 32 --batch-size 32 --max-new-tokens 64 \
  --out "$OUT/generation/generation_throughput" 2>&1 | grep -v -i warn | tee "$OUT/generation/log.txt"
