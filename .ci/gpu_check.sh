#!/usr/bin/env bash
# Every GPU check in one prepared run: the GPU tests, kernel tuning, an A/B profile of DeepSeek-V2-Lite's
# batch-1 step (the tuned decode kernels against the library path), the decode benchmark (with the tiles
# just measured) and the kernel benchmark. Each stage has its own time limit and log, so one that fails
# or overruns does not cost the others.  usage: .ci/gpu_check.sh [OUT_DIR] [PYTHON]
# STAGES picks stages (default: all, in this order); TUNE_ARGS and DECODE_ARGS add arguments to those;
# PROFILE_OFF names the decode kernels the profile also times turned off (see below).
set -u
cd "$(dirname "$0")/.."
out=${1:-bench_results}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=" ${STAGES:-gpu_tests tune profile decode kernels} "

rc=0
stage() {   # stage NAME SECONDS COMMAND...; leaves the exit status in rc (0 for a stage not picked)
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    rc=0
    case "$stages" in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL_LINES:-40}" "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
library=$(mktemp -d)/library_path.json     # a tuning file that turns the decode-sized kernels off
echo '{"moe": [], "disable": ["gemv", "linear", "route", "latent_cache", "absorb_query"]}' > "$library"
stage gpu_tests "${GPU_TESTS_S:-170}" $py -m pytest -q --maxfail=8 -m gpu tests -p no:cacheprovider
tests_rc=$rc
stage tune "${TUNE_S:-150}" $py -m moe_engine bench tune --out "$out/moe_tuning.json" ${TUNE_ARGS:-}
if [ -s "$out/moe_tuning.json" ]; then export MOE_ENGINE_TUNING="$out/moe_tuning.json"; fi
if [ "$tests_rc" != 0 ] && grep -qE "failed|[0-9] error|^[.sx]*[FE]" "$out/gpu_tests.log"; then
    echo "!!! GPU tests failed: the benchmarks below run with the decode-sized kernels off ($library)"
    export MOE_ENGINE_TUNING="$library"
fi
# The profile's A/B also times the step with each of PROFILE_OFF's kernels turned off, one at a time, on
# top of the tuning in use: which of them pays on this GPU.
variants=()
for kernel in ${PROFILE_OFF-absorb_query}; do
    variant=$(dirname "$library")/no_$kernel.json
    $py -c 'import json, os, sys
src = os.environ.get("MOE_ENGINE_TUNING")
data = json.load(open(src)) if src else {"moe": []}
data["disable"] = sorted(set(data.get("disable", [])) | {sys.argv[1]})
json.dump(data, open(sys.argv[2], "w"))' "$kernel" "$variant" && variants+=("$variant")
done
stage profile "${PROFILE_S:-120}" $py examples/profile_decode.py deepseek-v2-lite "$library" ${variants[@]+"${variants[@]}"}
stage decode "${DECODE_S:-270}" $py -m moe_engine bench decode --repeats 2 --hf-repeats 1 \
    --out "$out/decode.json" ${DECODE_ARGS:-}
stage kernels "${KERNELS_S:-80}" $py -m moe_engine bench kernels --min-time 0.1 --out "$out/kernels.json"
