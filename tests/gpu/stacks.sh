#!/usr/bin/env bash
# Where every loop process on the GPU host is (py-spy, carried as a wheel in .gpu/whl2): for a step that hangs.
#   bash tests/gpu/stacks.sh > /tmp/gpu-out/stacks.txt
spy=/tmp/site/bin/py-spy
for pid in $(pgrep -f "loop.worker.main|loop.cli serve|pytest"); do
  echo "== $pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-120)"
  timeout 20 "$spy" dump --pid "$pid" 2>&1 | head -60
done
