#!/usr/bin/env bash
# The README's test command: install vpatch with its probe and test extras, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[probe,test]'
python3 -m pytest -q "$@"
