#!/bin/bash
# Final (w3-fffshape HEAD): tests of the native kernels, then old (main 528895f) vs new in ONE process
# (1 thread, thread CPU time, fewest of 9 rounds), then bench ff before/after back to back (1 thread),
# then the whole suite.
set -x
cd "$(git rev-parse --show-toplevel)"  # the worktree at 88e63f5
git log --oneline -1
export ULTRAFASTBERT_CACHE=/tmp/ufb-cache-fffshape
PY=/work/main/.venv/bin/python
OUT=benchmarks/results/fff_one_walk
mkdir -p $OUT
uptime
PYTHONPATH=src timeout 600 $PY -m pytest -q -x -p no:cacheprovider tests/test_native_bf16.py tests/test_native.py tests/test_native_tuning.py tests/test_precision.py 2>&1 | tail -3
uptime
PYTHONPATH=src timeout 600 $PY benchmarks/kernel_bench.py --d-model 384 --configs 8x7,32x5 --tokens 1,128,4096 --threads 1 --clock thread --rounds 9 --budget-s 0.03 --dtypes float32,bfloat16 --old-rev 528895f --json $OUT/kernel_bench_d384_t1_cpu.json
uptime
PYTHONPATH=src timeout 600 $PY benchmarks/kernel_bench.py --d-model 768 --configs 1x11 --tokens 1,128,4096 --threads 1 --clock thread --rounds 9 --budget-s 0.03 --dtypes float32,bfloat16 --old-rev 528895f --json $OUT/kernel_bench_d768_t1_cpu.json
uptime
# before: main 528895f exported with `git archive 528895f src | tar -x -C /tmp/fffshape-base`
# (bench ff folders were written to before_$S/after_$S and copied to bench_ff_before_$S/...)
for S in d384 d768; do
  if [ $S = d384 ]; then A="--d-model 384 --dense-widths 1536 --dense-bias --configs 8x7,32x5"; else A="--d-model 768 --dense-widths 4095 --configs 1x11"; fi
  (cd /tmp/fffshape-base && PYTHONPATH=/tmp/fffshape-base/src timeout 500 $PY -m ultrafastbert.cli bench ff $A --threads 1 --tokens 1,128,4096 --implementations native,native-bf16 --dtypes float32,bfloat16 --out $OUT/before_$S > $OUT/before_$S.log 2>&1)
  uptime
  PYTHONPATH=src timeout 500 $PY -m ultrafastbert.cli bench ff $A --threads 1 --tokens 1,128,4096 --implementations native,native-bf16 --dtypes float32,bfloat16 --out $OUT/after_$S > $OUT/after_$S.log 2>&1
  uptime
done
PYTHONPATH=src timeout 900 $PY -m pytest -q -x -p no:cacheprovider 2>&1 | tail -15
uptime
