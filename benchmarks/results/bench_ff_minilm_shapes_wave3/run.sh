#!/bin/bash
# Wave-3 kernel figures (issue 21), one lock acquisition; run from the worktree root.
set -x
export ULTRAFASTBERT_CACHE=/tmp/ufb-cache-kernels PYTHONPATH=$PWD/src
PY=/work/main/.venv/bin/python
OUT=benchmarks/results/bench_ff_minilm_shapes_wave3
mkdir -p $OUT
uptime
timeout 400 $PY benchmarks/kernel_bench.py --d-model 384 --configs 8x7,32x5,12x5,16x6 --tokens 1,128,4096 --threads 2 --rounds 3 --budget-s 0.05 --old-rev d5de27d --json $OUT/kernel_bench_d384_t2.json
timeout 200 $PY benchmarks/kernel_bench.py --d-model 768 --configs 1x11 --tokens 128,4096 --threads 2 --rounds 3 --budget-s 0.05 --old-rev d5de27d --json $OUT/kernel_bench_d768_t2.json
timeout 400 $PY -m ultrafastbert.cli bench ff --d-model 384 --dense-widths 1536 --dense-bias --threads 2 --tokens 1,128,4096 --configs 8x7,32x5,12x5,16x6 --implementations native,native-bf16 --dtypes float32,bfloat16 --out $OUT
uptime
timeout 120 $PY benchmarks/results/bench_ff_minilm_shapes_wave3/walks_probe.py 1 8x7,32x5,12x5,16x6 2>&1 | grep -v Warn | tee $OUT/walks_t1_cputime.txt
uptime
