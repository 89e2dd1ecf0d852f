#!/usr/bin/env bash
# The vLLM backend's GPU suite and benchmark in one go, logs under OUT_DIR.
#
# On a GPU machine, from the repository root, with vLLM importable (the bundle of
# ../shared/gpu: `source .gpu/install.sh`):
#   tests/gpu/run_vllm.sh OUT_DIR [--quick | --tests-only | --bench-only]
# Wheels in .gpu/wheels (ndif's own dependencies the machine lacks) are installed first.
# The device tool allows 10 minutes a command: run --tests-only and --bench-only apart there
# (NDIF_BENCH_PARTS=plain,plain-eager then =ndif splits the benchmark further; `python -m
# tests.bench.vllm --report A.json B.json` joins the parts' tables).
set -u
out="${1:?usage: tests/gpu/run_vllm.sh OUT_DIR [--quick]}"
quick="${2:-}"
mkdir -p "$out"
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/ndif-deps .gpu/wheels/*.whl > "$out/deps.log" 2>&1
  export PYTHONPATH="/tmp/ndif-deps:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/workers:$PWD/scheduler:$PWD/sdk:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
lscpu > "$out/lscpu.txt" 2>&1  # runs on different hosts differ most in the host CPU
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))" \
  > "$out/versions.txt" 2>&1

if [ "$quick" != "--bench-only" ]; then
# One pytest process per file: each holds its own engines, as a worker process does.
for file in tests/gpu/test_vllm_backend.py tests/gpu/test_vllm_chat.py tests/gpu/test_vllm_tp.py; do
  started=$(date +%s)
  name=$(basename "$file" .py)
  NDIF_GPU_OUT="$out" timeout "${NDIF_TESTS_TIMEOUT:-900}" python3 -m pytest -v -s --durations=10 -p no:cacheprovider \
    -o addopts="" "$file" > "$out/$name.log" 2>&1
  echo "$name: rc=$? in $(( $(date +%s) - started )) s"
  grep -E "^(PASSED|FAILED|ERROR)|(PASSED|FAILED|ERROR)( |$)|^=+ .*(passed|failed|error)" "$out/$name.log" | tail -15
done
fi
[ "$quick" = "--tests-only" ] && exit 0

started=$(date +%s)
if [ "$quick" = "--quick" ]; then
  timeout 900 python3 -m tests.bench.vllm --out "$out" --layers 8 --requests 128 --tokens 64 > "$out/bench.txt" 2>&1
else
  timeout "${NDIF_BENCH_TIMEOUT:-1200}" python3 -m tests.bench.vllm --out "$out" --parts "${NDIF_BENCH_PARTS:-plain,plain-async,plain-eager,ndif,plain-piecewise,plain-inproc}" > "$out/bench.txt" 2>&1
fi
echo "benchmark: rc=$? in $(( $(date +%s) - started )) s"
tail -12 "$out/bench.txt"
