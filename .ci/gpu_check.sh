#!/usr/bin/env bash
# Every GPU check in one prepared run: the GPU tests, kernel tile tuning, the decode benchmark (with the
# tiles just measured) and the kernel benchmark. Each stage has its own time limit and log, so one that
# fails or overruns does not cost the others.  usage: .ci/gpu_check.sh [OUT_DIR] [PYTHON]
set -u
cd "$(dirname "$0")/.."
out=${1:-bench_results}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage() {   # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
stage gpu_tests "${GPU_TESTS_S:-140}" $py -m pytest -q -m gpu tests -p no:cacheprovider
stage tune "${TUNE_S:-90}" $py -m moe_engine bench tune --out "$out/moe_tuning.json"
if [ -s "$out/moe_tuning.json" ]; then export MOE_ENGINE_TUNING="$out/moe_tuning.json"; fi
stage decode "${DECODE_S:-270}" $py -m moe_engine bench decode --repeats 2 --hf-repeats 1 --compare-eager \
    --out "$out/decode.json"
stage kernels "${KERNELS_S:-80}" $py -m moe_engine bench kernels --min-time 0.1 --out "$out/kernels.json"
