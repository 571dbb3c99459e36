# Source on the GPU machine, from the repo root: installs the carried wheels (.whl/, built here by
# bench/wheels.sh) into /tmp/site and sets the environment the bench scripts and gpu tests expect.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import torch, transformers, bitsandbytes, peft; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)"
