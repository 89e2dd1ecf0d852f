#!/usr/bin/env bash
# On this machine (no GPU): build what a GPU run needs under .gpu/, in one go.
#   .gpu/part-NN, install.sh, sizes   the vLLM 0.26 bundle (../shared/gpu/bundle-vllm.sh)
#   .gpu/wheels/                      ndif's own dependencies the GPU machine lacks (Python 3.12)
# Then stage each part in its own `run` and run tests/gpu/run_vllm.sh (docs/vllm.md, "GPU checks").
set -euo pipefail
cd "$(dirname "$0")/../.."
shared="${NDIF_SHARED:-../shared}"
mkdir -p .git/info
bash "$shared/gpu/bundle-vllm.sh"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .gpu/wheels greenlet zstandard RestrictedPython pydantic-settings python-dotenv
ls -la .gpu .gpu/wheels
