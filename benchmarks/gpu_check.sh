#!/usr/bin/env bash
# The prepared GPU check: one short run on a CUDA machine (written for an H100/H200) that gathers
# everything the GPU part of the project needs, in about 8 minutes at most (the step limits below
# add up to 8 minutes; override them with PYTEST_LIMIT, TRITON_BENCH_LIMIT, BENCH_FF_LIMIT,
# BENCH_MODEL_LIMIT, and pass extra flags with BENCH_FF_ARGS / BENCH_MODEL_ARGS).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; writes to $OUT
#
# Installs nothing (the GPU machine may have no network): it uses the Python given by $PYTHON,
# else `python3`, which must hold torch with CUDA and triton (and pytest), and imports the package
# from src/ (PYTHONPATH), so no `pip install` is needed. Steps, each with its own time limit, a
# failed step does not stop the others:
#   1. environment: GPU, driver, Python, torch, CUDA, triton versions;
#   2. pytest -m gpu (the `gpu`-marked tests: Triton kernels vs the reference at 1x11, d 768);
#   3. benchmarks/triton_ff_cuda.py: Triton FFF vs cuBLAS / torch.compile'd dense-4095, forward
#      and forward+backward, fp32 and bf16, 16,384 tokens and fewer, tile sweep;
#   4. ultrafastbert bench ff --device cuda; 5. ultrafastbert bench model --device cuda.
# Output under $OUT (default results/gpu_check): gpu_check.log (everything), triton_ff_cuda.json,
# bench_ff_cuda/ and bench_model_cuda/ (packed into bench_cuda.tar.gz when the folders would
# bring back more than 8 files in all).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET ULTRAFASTBERT_TRITON_INTERPRET  # real kernels, never the interpreter
declare -a SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember its status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    SUMMARY+=("$name: exit $rc in $((SECONDS - start))s")
    echo "=== $name: exit $rc in $((SECONDS - start))s" | tee -a "$LOG"
}

environment() {
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('cuda available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, 'capability', p.major, p.minor, 'SMs', p.multi_processor_count)
import triton, pytest
print('triton', triton.__version__, 'pytest', pytest.__version__)
"
}
export -f environment
export PY
step environment 60 bash -c environment
if ! "$PY" -c "import torch, triton; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
    echo "no CUDA torch + triton in $PY: set PYTHON to a Python that has both" | tee -a "$LOG"
    exit 2
fi

step pytest-gpu "${PYTEST_LIMIT:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider -ra \
    --continue-on-collection-errors
step triton-ff-cuda "${TRITON_BENCH_LIMIT:-170}" "$PY" benchmarks/triton_ff_cuda.py --train \
    --sweep --out "$OUT/triton_ff_cuda.json"
CLI=("$PY" -c "import sys; from ultrafastbert.cli import main; sys.exit(main())")
# shellcheck disable=SC2086  # extra flags for the bench commands, split on purpose
step bench-ff "${BENCH_FF_LIMIT:-100}" "${CLI[@]}" bench ff --device cuda \
    --out "$OUT/bench_ff_cuda" ${BENCH_FF_ARGS:-}
# shellcheck disable=SC2086
step bench-model "${BENCH_MODEL_LIMIT:-60}" "${CLI[@]}" bench model --device cuda \
    --out "$OUT/bench_model_cuda" ${BENCH_MODEL_ARGS:-}

# The device tool brings back at most 8 files: pack the bench folders when there are more.
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    folders=$(cd "$OUT" && ls -d bench_*_cuda 2>/dev/null)
    if [ -n "$folders" ]; then
        (cd "$OUT" && tar czf bench_cuda.tar.gz $folders && rm -rf $folders)
    fi
fi
printf '%s\n' "=== summary" "${SUMMARY[@]}" | tee -a "$LOG"
