#!/usr/bin/env bash
# Everything loop runs on the lent GPU, in one detached job (a device call may last 10 minutes; this takes
# longer, so it runs under setsid and later calls read /tmp/gpu-out). Each step logs to /tmp/gpu-out/<step>.log
# and the summary line of each step goes to /tmp/gpu-out/summary.txt.
#   setsid bash tests/gpu/run-all.sh STEP... > /dev/null 2>&1 &      (steps: gputests e2e p1 p2 p1-14b)
set -uo pipefail
out=/tmp/gpu-out; mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 LOOP_TEST_START_TIMEOUT_S=900
py=python3
step() {
  local name=$1; shift
  echo "== $name: $* ($(date +%T))" >> "$out/summary.txt"
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" >> "$out/summary.txt"
  tail -n 25 "$out/$name.log" >> "$out/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$out/summary.txt"
for s in "$@"; do
  case $s in
    gputests) step gputests $py -m pytest -p no:cacheprovider -m gpu tests/gpu -v ;;
    e2e)      step e2e $py -m pytest -p no:cacheprovider -m e2e tests/e2e -v -x --deselect tests/e2e/test_zz_supervisor.py ;;
    e2e-all)  step e2e-all $py -m pytest -p no:cacheprovider -m e2e tests/e2e -v ;;
    p1)       step p1 $py -m loop.cli bench update --model loop/bench/configs/qwen2-7b --dummy --repeats 5 --json-out "$out/p1.json" ;;
    p1-small) step p1-small $py -m loop.cli bench update --model smollm2 --repeats 5 --gpu-memory-utilization 0.3 ;;
    p2)       step p2-1.5b $py -m loop.bench.train --model loop/bench/configs/qwen2-1.5b --random-init --device cuda --pairs 4 --seq 1024
              step p2-7b $py -m loop.bench.train --model loop/bench/configs/qwen2-7b --random-init --device cuda --pairs 4 --seq 1024 ;;
    p2-14b)   step p2-14b $py -m loop.bench.train --model loop/bench/configs/qwen2-14b --random-init --device cuda --pairs 4 --seq 1024 ;;
  esac
done
echo "== all done ($(date +%T))" >> "$out/summary.txt"
