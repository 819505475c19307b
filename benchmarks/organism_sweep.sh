#!/usr/bin/env bash
# Exploration only (device tool, one GPU): four organism training settings side by side, to see
# which attributes emerge with more steps. Not how the shipped weights are made (those come from
# `python examples/organism/train.py` on CPU). Needs the diffusers wheel carried in .whl/ and $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
python3 examples/organism/train.py --device cuda --steps 2800 --eval-every 700 --out /tmp/v1 > $OUT/v1.log 2>&1 &
python3 examples/organism/train.py --device cuda --steps 6000 --eval-every 1500 --out /tmp/v3 > $OUT/v3.log 2>&1 &
python3 examples/organism/train.py --device cuda --steps 2800 --lr 1e-3 --eval-every 700 --out /tmp/v4 > $OUT/v4.log 2>&1 &
python3 examples/organism/train.py --device cuda --steps 2800 --batch 64 --eval-every 700 --out /tmp/v5 > $OUT/v5.log 2>&1 &
wait
for f in $OUT/v*.log; do echo "== $f"; grep -E "eval|\"(colour|shape|motion|present)\"|step +(0|2799|5999) " $f; done
