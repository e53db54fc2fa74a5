#!/usr/bin/env bash
# Wheels that bench_gpu.py needs beside what a CUDA machine with torch, transformers, peft, accelerate,
# safetensors, pandas and matplotlib already has (Python 3.12, no network there): downloaded here, for
# CPython 3.12 on manylinux x86_64, into one folder to carry with the checkout.
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]        # default: benchmarks/_work/gpu-wheels
#
# On the GPU machine:  pip install --no-index --no-deps FOLDER/*.whl
# Prints the folder's size; what travels with the checkout is capped at 64 MiB (bitsandbytes is most of it).
set -euo pipefail
folder="${1:-$(dirname "$0")/_work/gpu-wheels}"
mkdir -p "$folder"
python -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any --dest "$folder" \
    trl datasets pydantic pydantic-core annotated-types typing-inspection dill multiprocess xxhash bitsandbytes pyyaml
du -sh "$folder"
size=$(du -sb "$folder" | cut -f1)
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "warning: $folder holds $size bytes, over the 64 MiB that can travel" >&2
fi
