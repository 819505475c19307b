"""Apply, inspect and revert a delta on a tiny diffusers-style folder, through the Python API and the CLI.

    python examples/quickstart.py [WORKDIR]

Until `vpatch probe` lands, the delta here is built with the API from a chosen direction: the same
closed form W' = W - λ (W B) Bᵀ that the probe writes, on a toy Wan-like transformer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import patcher
from patcher.erasure.refusal import orthonormalize
from patcher.vud.delta import Delta, projection_entry


def build_pipeline(root: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        f"blocks.{i}.attn2.{p}.weight": (torch.randn(64, 64, generator=g) * 0.05).to(torch.bfloat16)
        for i in range(2)
        for p in ("to_q", "to_k", "to_v")
    }
    t["condition_embedder.text_embedder.linear_1.weight"] = (
        torch.randn(64, 32, generator=g) * 0.05
    ).to(torch.bfloat16)
    (root / "transformer").mkdir(parents=True)
    save_file(
        t, root / "transformer" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"}
    )
    (root / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel"})
    )
    (root / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
        )
    )
    return t


def main() -> None:
    work = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(tempfile.mkdtemp(prefix="vpatch-quickstart-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    t = build_pipeline(work / "wan-tiny")
    B = orthonormalize(
        torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
    )  # stand-in "concept" direction
    key = "condition_embedder.text_embedder.linear_1.weight"
    W = t[key]
    entry = projection_entry(
        f"transformer/{key}",
        W.float(),
        B,
        1.0,
        hashlib.sha256(W.view(torch.int16).numpy().tobytes()).hexdigest(),
        "BF16",
    )
    patcher.write_delta(
        work / "concept.vud", Delta([entry], {"name": "demo-concept"}, {"name": "manual-direction"})
    )

    vp = [sys.executable, "-m", "patcher.cli"]
    for args in (
        ["inspect", work / "concept.vud"],
        ["apply", work / "wan-tiny", work / "concept.vud", "--dry-run"],
        [
            "apply",
            work / "wan-tiny",
            work / "concept.vud",
            "-o",
            work / "wan-tiny-safe",
            "--revert-record",
            work / "private.revert",
        ],
        ["inspect", work / "wan-tiny-safe"],
        [
            "revert",
            work / "wan-tiny-safe",
            work / "concept.vud",
            "-o",
            work / "wan-tiny-restored",
            "--record",
            work / "private.revert",
        ],
    ):
        print(f"\n$ vpatch {' '.join(str(a) for a in args)}", flush=True)
        subprocess.run(vp + [str(a) for a in args], check=True)

    from safetensors.torch import load_file

    safe = load_file(
        work / "wan-tiny-safe" / "transformer" / "diffusion_pytorch_model.safetensors"
    )[key].float()
    print(
        f"\nconcept read by the edited layer: before {float((W.float() @ B).norm()):.4f}, after {float((safe @ B).norm()):.4f}"
    )
    same = (
        work / "wan-tiny" / "transformer" / "diffusion_pytorch_model.safetensors"
    ).read_bytes() == (
        work / "wan-tiny-restored" / "transformer" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    print(f"revert restored the original bytes exactly: {same}")
    print(f"files in {work}")


if __name__ == "__main__":
    main()
