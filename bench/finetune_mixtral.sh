#!/usr/bin/env bash
# Device side of bench/finetune_mixtral.py (one `run` call, carry .whl, built here by bench/wheels.sh):
#   bash bench/finetune_mixtral.sh [extra args for finetune_mixtral.py]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv
python3 bench/finetune_mixtral.py --out "$OUT" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/log.txt"
