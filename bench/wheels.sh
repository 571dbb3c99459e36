#!/usr/bin/env bash
# Build .whl/ here, for the GPU benchmarks on the device machine (which reaches no network):
#   * the wheels its image lacks (bitsandbytes, trl, datasets, pydantic, ...) or holds at another
#     version than requirements.txt pins (transformers, huggingface_hub, peft), CPython 3.12 x86-64;
#   * bitsandbytes slimmed to its CUDA 13 and CPU libraries (the image's torch is 2.11+cu130), so
#     the folder stays under 40 MiB (a `run` carries at most 64 MiB);
#   * the tokenizers the benchmarks read: .whl/mistral-v1-tokenizer (Mixtral's, built by the kit) and
#     .whl/smollm2-tokenizer (the embedded SmolLM2's).
# Usage (repo root): bash bench/wheels.sh        On the device: see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The image's packages (/work/.library/device/KINDS.md): torch 2.11+cu130, triton, accelerate 1.15, tokenizers,
# safetensors, numpy, pandas, pyarrow, xxhash, pyyaml, httpx, hf-xet are there. Missing or at another version:
PACKAGES=(bitsandbytes trl peft transformers huggingface_hub httpx2 httpcore2 truststore datasets dill multiprocess
          pydantic pydantic_core annotated-types typing-inspection typing_extensions
          cryptography cffi pycparser SQLAlchemy)  # the last four: the app's encrypted store (bench/app_bench.py)

pin() {  # "name==version" as requirements.txt pins it (names compared as pip does: case, - and _ alike)
  local want
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    local name=${line%%==*}
    if [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ]; then echo "$line"; return; fi
  done < <(grep -E '^[A-Za-z0-9_.-]+==' requirements.txt)
  echo "bench/wheels.sh: $1 is not pinned in requirements.txt" >&2
  exit 1
}

specs=()
for p in "${PACKAGES[@]}"; do specs+=("$(pin "$p")"); done
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d "$OUT" "${specs[@]}"

# bitsandbytes ships one library per CUDA version (~100 MiB in all): keep CUDA 13's and the CPU one.
bnb=$(ls "$OUT"/bitsandbytes-*.whl)
"$PY" - "$bnb" <<'EOF'
import base64, csv, hashlib, io, os, re, sys, zipfile

path = sys.argv[1]
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [n for n in src.namelist() if not n.endswith(".so") or keep.search(n)]
    if not any(keep.search(n) and "cuda130" in n for n in names):
        sys.exit(f"{path}: no libbitsandbytes_cuda130.so inside; the device's torch needs it")
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    rows = []
    for n in names:
        if n == record:
            continue
        data = src.read(n)
        dst.writestr(n, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append((n, f"sha256={digest}", str(len(data))))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows + [(record, "", "")])
    dst.writestr(record, out.getvalue())
os.replace(tmp, path)
EOF

# Tokenizers: built or found by the kit here, read from a folder there.
HF_HUB_OFFLINE=1 PYTHONPATH=$PWD "$PY" - "$OUT" <<'EOF'
import shutil, sys
from pathlib import Path

from phyassist.data.format import mistral_v1_tokenizer
from phyassist.models.registry import resolve_model_path
from transformers import AutoTokenizer

out = Path(sys.argv[1])
mistral_v1_tokenizer().save_pretrained(out / "mistral-v1-tokenizer")
AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(out / "smollm2-tokenizer")
EOF

ls -1 "$OUT"
du -sh "$OUT"
total=$(du -sm "$OUT" | cut -f1)
if [ "$total" -ge 40 ]; then echo "bench/wheels.sh: $OUT is $total MiB, over 40" >&2; exit 1; fi
