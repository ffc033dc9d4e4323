#!/usr/bin/env bash
# Everything loop runs on the lent GPU, in one detached job (a device call may last 10 minutes; this takes
# longer, so it runs under setsid and later calls read /tmp/gpu-out). Each step logs to /tmp/gpu-out/<step>.log
# and the summary line of each step goes to /tmp/gpu-out/summary.txt.
#   setsid bash tests/gpu/run-all.sh STEP... > /dev/null 2>&1 &
# steps: gputests e2e e2e-all p1 p1-small p2 p2-14b mem-7b mem-14b mem-24b mem-32b dir-7b dir-14b
#        durable-7b durable-small private faults screen in-flight proxy-7b serving-7b serving-7b-default serving-7b-poll
#        serving-7b-long mps-7b
#        serving-7b-guard families families-left big-q35 big-moe mem-moe mem-q35 tp-e2e replicas-e2e remote-e2e p1-replicas p1-tp (two cards)
#        learning-lr learning-steps learning-budget learning-nll learning-nll-long learning-nll-lr learning-replay learning-replay2 learning-replay-all
#        learning-default
# On a two-card host run two of these at once, each with CUDA_VISIBLE_DEVICES=<card> and GPU_OUT=<its own dir>.
set -uo pipefail
out=${GPU_OUT:-/tmp/gpu-out}; mkdir -p "$out"
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
# vLLM's share of the card for a model of W GB: its weights + 8 GB (KV cache, graphs, activations), at most 0.92
util() { python3 -c "import torch; t = torch.cuda.mem_get_info()[1] / 1e9; print(round(min(0.92, ($1 + 8) / t), 3))"; }
# vLLM's share for K replicas of W GB: each has its card on a host with K cards, else they share card 0
rutil() { python3 -c "import torch; k = $2 if torch.cuda.device_count() < $2 else 1; t = torch.cuda.mem_get_info()[1] / 1e9; print(round(min(0.92, k * ($1 + 8) / t), 3))"; }
mem() {  # P2 beside a serving vLLM, and the largest-model check: loop bench memory on a dummy config
  local name=$1 gb=$2 pairs=${3:-2}; shift 3 2>/dev/null || shift $#
  step "mem-$name" $py -m loop.cli bench memory --model "loop/bench/configs/$name" --dummy --pairs "$pairs" --seq 1024 \
    --gpu-memory-utilization "$(util "$gb")" --json-out "$out/mem-$name.json" "$@"
}
big() {  # P1 and P2 of a model over a third of the card: staged deltas drawn per tensor, vLLM eager (starts faster)
  local name=$1 gb=$2
  step "p1-$name" $py -m loop.cli bench update --model "loop/bench/configs/$name" --dummy --repeats 3 --lean --eager \
    --gpu-memory-utilization "$(util "$gb")" --json-out "$out/p1-$name.json"
  mem "$name" "$gb" 1 --modes lowmem,staged --steps 3 --eager
}
families() {  # tests/gpu/test_families_gpu.py, one stream per argument on the one card (fixed KV caches: no profiling)
  local f=tests/gpu/test_families_gpu.py t=test_a_family_trains_in_place_on_cuda_vllm i=0 pids=() rc=0 ids
  for ids in "$@"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    $py -m pytest -p no:cacheprovider -m gpu -v -s $(printf "$f::$t[%s] " $ids) > "$out/families-$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  grep -h -E "PASSED|FAILED|ERROR| views|passed|failed" "$out"/families-*.log
  return $rc
}
learning() {  # the learning suite (SmolLM2), one run per "name|flags" argument, as many at once as the card holds
  $py -c "from loop.config import Settings; from loop.model_cache import resolve_model; s = Settings(); \
print(resolve_model(s.model, s.cache_dir))" >> "$out/summary.txt" 2>&1  # converted once, before the runs share it
  # a run holds its vLLM's 0.04 of the card and a worker that grows to several GB with replayed pairs: twelve at
  # once ran an 80 GB card out of memory, so one run per 10 GB of the card
  local spec name pids=() rc=0 most
  most=$($py -c "import torch; print(max(1, int(torch.cuda.mem_get_info()[1] / 1e10)))")
  for spec in "$@"; do
    name=${spec%%|*}
    while [ "$(jobs -rp | wc -l)" -ge "$most" ]; do sleep 5; done
    # shellcheck disable=SC2086
    LOOP_GPU_MEMORY_UTILIZATION=0.04 LOOP_ENFORCE_EAGER=true $py -m loop.cli bench learning ${spec#*|} \
      --json "$out/learning-$name.json" > "$out/learning-$name.log" 2>&1 &
    pids+=($!)
    sleep 15  # vLLM sizes its KV cache from the memory free while it starts: one start at a time
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for spec in "$@"; do name=${spec%%|*}; echo "-- $name"; tail -n 12 "$out/learning-$name.log"; done
  return $rc
}
replay1=(
  "number-r0|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1"
  "direct-r0|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0"
  "number-r32|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --scheduler-set replay_pairs=32"
  "direct-r32|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set replay_pairs=32"
  "number-r64|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --scheduler-set replay_pairs=64"
  "direct-r64|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set replay_pairs=64"
  "short-r32|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set replay_pairs=32"
)
replay2=(
  "long-r32|--rater short --rounds 20 --poison ab:4 --poison thumbs:9 --mixed 14 --seed 0 --scheduler-set replay_pairs=32"
  "number-r64-1e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 1e-5 --scheduler-set replay_pairs=64"
  "direct-r64-1e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 1e-5 --scheduler-set replay_pairs=64"
  "number-r32-20|--rater number --rounds 20 --poison thumbs:4 --poison ab:7 --seed 1 --scheduler-set replay_pairs=32"
  "direct-r32-20|--rater direct --rounds 20 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set replay_pairs=32"
)
for s in "$@"; do
  case $s in
    # the held-out trait per round at the default learning rate and above it, for the raters that learn slowly on
    # the CPU at the default (issue 12); the poison rounds of their measurement rows
    learning-lr) step learning-lr learning \
                "number-default|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1" \
                "number-1e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 1e-5" \
                "number-2e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 2e-5" \
                "number-4e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 4e-5" \
                "direct-default|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0" \
                "direct-1e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 1e-5" \
                "direct-2e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 2e-5" \
                "direct-4e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 4e-5" ;;
    # the same raters with more steps a run (each run fits its ~10 new pairs longer), at the default lr and twice it
    learning-steps) step learning-steps learning \
                "number-s4|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 4" \
                "number-s8|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 8" \
                "number-s4-1e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 4 --learning-rate 1e-5" \
                "number-s8-1e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 8 --learning-rate 1e-5" \
                "direct-s4|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 4" \
                "direct-s8|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 8" \
                "direct-s4-1e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 4 --learning-rate 1e-5" \
                "direct-s8-1e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 8 --learning-rate 1e-5" ;;
    # what the perplexity budget costs: 8 steps a run with every prompt rated each round, and with the canary
    # perplexity limits (per run and against the base) at +15 % instead of +5 %
    learning-budget) step learning-budget learning \
                "number-p50-s8|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --prompts 50 --steps 8" \
                "direct-p50-s8|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --prompts 50 --steps 8" \
                "number-s8-loose|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 8 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15" \
                "direct-s8-loose|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 8 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15" \
                "number-s8-1e-5-loose|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 8 --learning-rate 1e-5 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15" \
                "direct-s8-1e-5-loose|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 8 --learning-rate 1e-5 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15" \
                "number-p50-s8-loose|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --prompts 50 --steps 8 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15" \
                "direct-p50-s8-loose|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --prompts 50 --steps 8 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15" ;;
    # the suite at the service's defaults (whatever they are now), every rater on two seeds, and the long run
    learning-default) step learning-default learning \
                "number-s1|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1" \
                "number-s2|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 2" \
                "direct-s0|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0" \
                "direct-s1|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 1" \
                "short-s0|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0" \
                "short-s1|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 1" \
                "long-s0|--rater short --rounds 20 --poison ab:4 --poison thumbs:9 --mixed 14 --seed 0" ;;
    # the preferred answers' likelihood beside the preference loss (nll_weight, RPO's alpha), at the defaults otherwise
    learning-nll) step learning-nll learning \
                "number-nll1|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --scheduler-set nll_weight=1" \
                "number-nll4|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --scheduler-set nll_weight=4" \
                "number-nll1-s8|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --steps 8 --scheduler-set nll_weight=1" \
                "number-nll1-2e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 2e-5 --scheduler-set nll_weight=1" \
                "direct-nll1|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set nll_weight=1" \
                "direct-nll4|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set nll_weight=4" \
                "direct-nll1-s8|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 8 --scheduler-set nll_weight=1" \
                "short-nll1|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --scheduler-set nll_weight=1" ;;
    # the same against the preference loss alone on this card, the suite's long run, and the slow raters pushed
    learning-nll-long) step learning-nll-long learning \
                "short-nll0|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0" \
                "long-nll0|--rater short --rounds 20 --poison ab:4 --poison thumbs:9 --mixed 14 --seed 0" \
                "long-nll1|--rater short --rounds 20 --poison ab:4 --poison thumbs:9 --mixed 14 --seed 0 --scheduler-set nll_weight=1" \
                "direct-nll1-s4|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --steps 4 --scheduler-set nll_weight=1" \
                "direct-nll1-2e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 2e-5 --scheduler-set nll_weight=1" \
                "direct-nll1-p50-s4-loose|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --prompts 50 --steps 4 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15 --scheduler-set nll_weight=1" \
                "number-nll1-p50-s4-loose|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --prompts 50 --steps 4 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15 --scheduler-set nll_weight=1" \
                "number-nll1-p50-s8-2e-5-loose|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --prompts 50 --steps 8 --learning-rate 2e-5 --scheduler-set max_perplexity_vs_base=0.15 --scheduler-set max_perplexity_rise=0.15 --scheduler-set nll_weight=1" ;;
    # candidate defaults: the likelihood term with a higher learning rate, on every rater and the long run
    learning-nll-lr) step learning-nll-lr learning \
                "long-nll1-1e-5|--rater short --rounds 20 --poison ab:4 --poison thumbs:9 --mixed 14 --seed 0 --learning-rate 1e-5 --scheduler-set nll_weight=1" \
                "long-nll1-2e-5|--rater short --rounds 20 --poison ab:4 --poison thumbs:9 --mixed 14 --seed 0 --learning-rate 2e-5 --scheduler-set nll_weight=1" \
                "short-nll1-1e-5|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 1e-5 --scheduler-set nll_weight=1" \
                "short-nll1-2e-5|--rater short --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 2e-5 --scheduler-set nll_weight=1" \
                "number-nll1-1e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 1e-5 --scheduler-set nll_weight=1" \
                "direct-nll1-1e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 1e-5 --scheduler-set nll_weight=1" \
                "number-nll2-2e-5|--rater number --rounds 10 --poison thumbs:4 --poison ab:7 --seed 1 --learning-rate 2e-5 --scheduler-set nll_weight=2" \
                "direct-nll2-2e-5|--rater direct --rounds 10 --poison ab:4 --poison thumbs:7 --seed 0 --learning-rate 2e-5 --scheduler-set nll_weight=2" ;;
    # replaying kept pairs beside each new batch (replay_pairs), at the defaults otherwise (nll_weight 1), beside
    # the same runs without it (on whichever card this is); the second sweep holds a higher learning rate with
    # replay and 20 rounds (the first fits ~6 minutes); learning-replay-all runs both at once
    learning-replay) step learning-replay learning "${replay1[@]}" ;;
    learning-replay2) step learning-replay2 learning "${replay2[@]}" ;;
    learning-replay-all) step learning-replay-all learning "${replay1[@]}" "${replay2[@]}" ;;
    gputests) step gputests $py -m pytest -p no:cacheprovider -m gpu tests/gpu -v ;;
    e2e)      step e2e $py -m pytest -p no:cacheprovider -m e2e tests/e2e -v -x --deselect tests/e2e/test_supervisor_e2e.py ;;
    e2e-all)  step e2e-all $py -m pytest -p no:cacheprovider -m "e2e and not cpu_vllm" tests/e2e -v ;;
    p1)       step p1 $py -m loop.cli bench update --model loop/bench/configs/qwen2-7b --dummy --repeats 5 --json-out "$out/p1.json" ;;
    p1-small) step p1-small $py -m loop.cli bench update --model smollm2 --repeats 5 --gpu-memory-utilization 0.3 ;;
    p2)       step p2-1.5b $py -m loop.bench.train --model loop/bench/configs/qwen2-1.5b --random-init --device cuda --pairs 4 --seq 1024
              step p2-7b $py -m loop.bench.train --model loop/bench/configs/qwen2-7b --random-init --device cuda --pairs 4 --seq 1024 ;;
    mem-7b)   mem qwen2-7b 15.2 ;;
    mem-14b)  mem qwen2-14b 29.5 ;;
    mem-24b)  mem mistral-24b 47.2 1 ;;
    mem-32b)  mem qwen2-32b 65.5 1 ;;
    durable-7b)    step durable-7b $py -m loop.cli bench durable --model loop/bench/configs/qwen2-7b --dummy --json-out "$out/durable-7b.json" ;;
    proxy-7b) step proxy-7b $py -m loop.cli bench proxy --model loop/bench/configs/qwen2-7b --dummy \
                --gpu-memory-utilization "$(util 15.2)" -n 200 --max-tokens 16 --start-timeout 900 --json-out "$out/proxy-7b.json" ;;
    durable-small) step durable-small $py -m loop.cli bench durable --model smollm2 --gpu-memory-utilization 0.3 --json-out "$out/durable-small.json" ;;
    private)  step private $py -m pytest -p no:cacheprovider tests/e2e/test_vllm_private_e2e.py tests/e2e/test_access_e2e.py -v ;;
    faults)   step faults $py -m pytest -p no:cacheprovider -s tests/faults/test_kill_e2e.py -v ;;
    in-flight) step in-flight $py -m pytest -p no:cacheprovider tests/e2e/test_training_e2e.py -v -k "in_flight or checkpoint_of" ;;
    screen)   step screen $py -m pytest -p no:cacheprovider -m gpu tests/gpu/test_direction_gpu.py -v ;;
    dir-7b)   step dir-7b $py -m loop.cli bench direction --model loop/bench/configs/qwen2-7b --dummy --device cuda ;;
    dir-14b)  step dir-14b $py -m loop.cli bench direction --model loop/bench/configs/qwen2-14b --dummy --device cuda ;;
    # serving while training (vLLM and the trainer share the card: vLLM gets what mem-7b gives it)
    serving-7b) step serving-7b $py -m loop.cli bench serving --model loop/bench/configs/qwen2-7b --dummy \
                  --gpu-memory-utilization "$(util 15.2)" \
                  --configs alone,staged-keep,staged-wait,lowmem-keep,hogwild,staged-keep@0.5,staged-keep@0.25,staged-keep@0.15 \
                  --duration 20 --json-out "$out/serving-7b.json" ;;
    # the default (paced at 0.1, keep-mode guard 0.2) at the issue's load, beside the former 0.15; then the same
    # with the pacer reading vLLM's /metrics every 0.3 s instead of 0.075 s (each read costs vLLM's API server)
    serving-7b-default) step serving-7b-default $py -m loop.cli bench serving --model loop/bench/configs/qwen2-7b --dummy \
                  --gpu-memory-utilization "$(util 15.2)" \
                  --configs "${DEFAULT_CONFIGS:-alone,staged-keep@0.1~0.2,staged-keep@0.15~0.2}" \
                  --duration "${DEFAULT_DURATION:-30}" --json-out "$out/serving-7b-default.json" ;;
    serving-7b-poll) step serving-7b-poll $py -m loop.cli bench serving --model loop/bench/configs/qwen2-7b --dummy \
                  --gpu-memory-utilization "$(util 15.2)" --configs alone,staged-keep@0.15~0.2 --load-interval 0.3 \
                  --duration 20 --json-out "$out/serving-7b-poll.json" ;;
    mps-7b)   step mps-7b $py -m loop.cli bench serving --model loop/bench/configs/qwen2-7b --dummy \
                  --gpu-memory-utilization "$(util 15.2)" --mps 30 --configs alone,staged-keep --duration 20 \
                  --json-out "$out/mps-7b.json" ;;
    serving-7b-long) step serving-7b-long $py -m loop.cli bench serving --model loop/bench/configs/qwen2-7b --dummy \
                  --gpu-memory-utilization "$(util 15.2)" --answer-len 2048 --max-model-len 4096 \
                  --configs alone,staged-keep@0.15,staged-keep,staged-wait --duration 30 --json-out "$out/serving-7b-long.json" ;;
    # the default on the card (paced at 0.1, keep-mode writes guarded at a recompute share of 0.2) with long answers
    serving-7b-guard) step serving-7b-guard $py -m loop.cli bench serving --model loop/bench/configs/qwen2-7b --dummy \
                  --gpu-memory-utilization "$(util 15.2)" --answer-len 2048 --max-model-len 4096 \
                  --configs "${GUARD_CONFIGS:-alone,staged-keep@0.1~0.2,staged-keep@0.15~0.2}" --duration 30 \
                  --json-out "$out/serving-7b-guard.json" ;;
    families) step families families "llama qwen2 qwen3 qwen3_moe" "mistral gemma3 phi3 llama4" "qwen3_5_vl" ;;
    families-left) step families-left families qwen3_5_vl ;;
    # two cards (nvidia-h200-x2): the tensor-parallel end-to-end suite on CUDA vLLM with TP 2, in bf16
    tp-e2e)   step tp-e2e env LOOP_TEST_TP_DTYPE=bfloat16 NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT $py -m pytest -p no:cacheprovider -m e2e -v -s \
                tests/e2e/test_tensor_parallel_e2e.py ;;
    # two 7B replicas: on one card they share it, on two cards one each
    p1-replicas) step p1-replicas $py -m loop.cli bench update --model loop/bench/configs/qwen2-7b --dummy --repeats 5 \
                --replicas 2 --gpu-memory-utilization "$(rutil 15.2 2)" --json-out "$out/p1-replicas.json" ;;
    # two cards: one vLLM split over both; every rank's slices are written in its own thread, timed per rank
    p1-tp)    step p1-tp $py -m loop.cli bench update --model loop/bench/configs/qwen2-7b --dummy --tensor-parallel 2 \
                --repeats 5 --json-out "$out/p1-tp.json" ;;
    # two replicas, one a card on a two-card host, both on the card on one (each with half vLLM's share); the worker
    # copies each update into replica 1 in the same pause
    replicas-e2e) step replicas-e2e env LOOP_TEST_REPLICAS_DTYPE=bfloat16 $py -m pytest -p no:cacheprovider -m e2e -v -s \
                tests/e2e/test_replicas_e2e.py ;;
    # a replica on "another host" as a second process on the card: `loop replica` and its own vLLM beside loop's,
    # the transfers over gloo (NCCL refuses two ranks on one device); prints what each update cost to reach it.
    # Its tensor-parallel-2 half needs four cards (loop's ranks on 0-1, the agent's on 2-3) and skips on fewer
    remote-e2e) step remote-e2e env LOOP_TEST_REPLICAS_DTYPE=bfloat16 LOOP_TEST_REMOTE_ON_GPU=1 \
                LOOP_REPLICA_BACKEND=gloo LOOP_GPU_MEMORY_UTILIZATION=0.2 LOOP_ENFORCE_EAGER=true $py -m pytest -p no:cacheprovider -m e2e -v -s \
                tests/e2e/test_remote_replica_e2e.py ;;
    big-q35)  big qwen3_5-27b 54.7 ;;
    big-moe)  big qwen3-30b-a3b 61.1 ;;
    mem-moe)  mem qwen3-30b-a3b 61.1 1 --modes lowmem,staged --steps 3 --eager ;;
    mem-q35)  mem qwen3_5-27b 54.7 1 --modes lowmem,staged --steps 3 --eager ;;
    p2-14b)   step p2-14b $py -m loop.bench.train --model loop/bench/configs/qwen2-14b --random-init --device cuda --pairs 4 --seq 1024 ;;
  esac
done
echo "== all done ($(date +%T))" >> "$out/summary.txt"
