#!/usr/bin/env bash
# The README's test command, complete on a fresh machine: the CPU torch wheel first when no torch is
# installed (a bare `torch` requirement resolves to a multi-GB CUDA build), an existing torch left as
# it is; then vpatch with its probe, eval, nudenet and test extras, then the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${VPATCH_TORCH_VERSION:-2.13.0}
CPU_INDEX=${VPATCH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "test.sh: using the installed torch ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
else
  # the +cpu build from the configured indexes or wheel folders; else from PyTorch's CPU index
  echo "test.sh: no torch found; installing the CPU wheel torch==$TORCH_VERSION+cpu" >&2
  "$PY" -m pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null ||
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
fi
"$PY" -m pip install -q -e '.[probe,eval,nudenet,test]'
"$PY" -m pytest -q "$@"
