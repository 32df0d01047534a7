#!/usr/bin/env bash
# Download, on a machine WITH network, the Python packages that bench/gpu_check.sh needs on a GPU machine WITHOUT
# network, into .whl/ at the repository root (gitignored). gpu_check.sh installs them there with
# `pip install --no-index --no-deps --target` and puts the target on PYTHONPATH.
#
#   bash bench/gpu_wheels.sh            # -> .whl/*.whl + .whl/deepspeed-0.18.6.tar.gz (about 8 MB)
#   WHEEL_DIR=/tmp/w bash bench/gpu_wheels.sh
#
# What the GPU image already holds (torch, transformers 5.17, accelerate 1.15, tokenizers, pyarrow, pandas, sympy,
# huggingface-hub, xxhash, psutil, ninja, msgpack, einops, py-cpuinfo, nvidia-ml-py) is not downloaded. The list below
# is the project's pins (pyproject.toml) and the versions they resolved to in the project's venv; --no-deps, so every
# dependency is named. Wheels are for CPython 3.12 on x86-64 Linux (the GPU image's Python). deepspeed is published as
# an sdist only: it installs offline with `DS_BUILD_OPS=0 pip install --no-build-isolation --no-deps` (no ops are
# compiled; ZeRO-2 with the Trainer's torch AdamW needs none).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PY="${PY:-python3}"

WHEELS=(
  trl==1.16.0 datasets==5.2.0 peft==0.21.2 # training (peft: the image's may differ from the pin)
  dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 # datasets' pins (fsspec <= 2026.9.0)
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 # grading (evaluation)
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 # deepspeed
  typing-extensions==4.16.0 # pydantic 2.14 needs >= 4.16
)
SDISTS=(deepspeed==0.18.6)

mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DEST" "${SDISTS[@]}"
ls -l "$DEST"
du -sh "$DEST"
echo "gpu_wheels: ${#WHEELS[@]} wheels + ${#SDISTS[@]} sdist in $DEST; carry it: run(carry=[\".whl\"], ...)"
