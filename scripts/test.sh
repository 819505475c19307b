#!/usr/bin/env bash
# The README's test command: install vpatch with its probe, eval, nudenet and test extras, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[probe,eval,nudenet,test]'
python3 -m pytest -q "$@"
