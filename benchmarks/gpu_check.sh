#!/usr/bin/env bash
# The one prepared GPU run (device tool): real-size probe benchmark on CUDA, and a denoise-mode probe
# with accelerate's model offload on a tiny pipeline. Needs the diffusers wheel carried in .whl/.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
echo "== offload: denoise-mode probe on a tiny CogVideoX, --offload model vs none"
python3 - <<'PY' 2>&1 | grep -v -i warn
import json, tempfile, torch
from pathlib import Path
from click.testing import CliRunner
from tests import tiny_pipes
from patcher.cli import main
from patcher.vud.delta import read_delta
d = Path(tempfile.mkdtemp())
src, _ = tiny_pipes.cogvideox(d / "cog")
sets = ["denoise.steps=2", "denoise.call.max_sequence_length=16", "denoise.call.num_frames=8", "denoise.call.height=16", "denoise.call.width=16"]
V = {}
for off in ("none", "model"):
    args = ["probe", str(src), "-c", "nudity", "-o", str(d / f"{off}.vud"), "--layers", "joint_kv", "--rank", "4", "--device", "cuda",
            "--dtype", "float32", "--offload", off, "--json"] + [a for s in sets for a in ("--set", s)]
    r = CliRunner().invoke(main, args)
    print(off, "exit", r.exit_code, (r.stdout or r.output)[-300:].replace("\n", " "))
    V[off] = read_delta(d / f"{off}.vud").entries[0].V[:, 0]
print("offload model vs none: |cos| =", float(abs(V["none"] @ V["model"])))
PY
echo "== probe_bench on cuda"
python3 benchmarks/probe_bench.py --device cuda --dir /tmp/pb --json "$OUT/probe_bench_gpu.json" 2>&1 | grep -v -i -E "warn|it/s"
