#!/usr/bin/env bash
# Installs the real open-webui package into its own virtualenv for tests/e2e/test_openwebui_e2e.py.
#
# Why a separate venv: Open WebUI pins ~100 dependencies (transformers, chromadb, ...) that would fight loop's
# own. torch is overridden to the CPU build already on disk (pip's find-links folder) and the CUDA-only packages
# are dropped, the same overrides the vLLM notes use, so nothing downloads CUDA wheels.
#
# Usage: bash tests/openwebui/install.sh [VENV]   (default $LOOP_OPENWEBUI_VENV or /tmp/loop-openwebui-venv)
# The test finds the venv through LOOP_OPENWEBUI_VENV (same default). Re-running on a ready venv is a no-op.
set -euo pipefail
VENV="${1:-${LOOP_OPENWEBUI_VENV:-/tmp/loop-openwebui-venv}}"
VERSION="0.12.4"
if [ -x "$VENV/bin/open-webui" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('open-webui') != '$VERSION')" 2>/dev/null; then
  echo "open-webui $VERSION already in $VENV"; exit 0
fi
PY="${LOOP_OPENWEBUI_PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}"
FIND_LINKS="$(pip config get global.find-links 2>/dev/null || true)"
HERE="$(cd "$(dirname "$0")" && pwd)"
uv venv --quiet --python "$PY" "$VENV"
args=(--python "$VENV/bin/python" --override "$HERE/overrides.txt")
if [ -n "$FIND_LINKS" ]; then args+=(--find-links "$FIND_LINKS"); fi
uv pip install "${args[@]}" "open-webui==$VERSION"
"$VENV/bin/python" -c "import importlib.metadata as m; print('open-webui', m.version('open-webui'), 'in', '$VENV')"
