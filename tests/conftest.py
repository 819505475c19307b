"""Synthetic checkpoints and deltas, built in tmp_path with safetensors' own ``save_file``."""

from __future__ import annotations

import os

# No hub is reachable from tests: fail fast instead of retrying the network (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from patcher.erasure.refusal import orthonormalize
from patcher.vud.delta import Delta, DeltaEntry, projection_entry, write_delta

K = "blocks.0.attn2.to_k.weight"
V = "blocks.0.attn2.to_v.weight"
K1 = "blocks.1.attn2.to_k.weight"
UNTOUCHED = ("blocks.0.attn1.to_q.weight", "blocks.0.norm.bias", "proj_out.weight")


def raw_sha(t: torch.Tensor) -> str:
    t = t.contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def model_tensors(dtype=torch.bfloat16, seed=0, in_dim=24, out_dim=40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "blocks.0.attn1.to_q.weight": torch.randn(out_dim, out_dim, generator=g),
        K: torch.randn(out_dim, in_dim, generator=g) * 0.05,
        V: torch.randn(out_dim, in_dim, generator=g) * 0.05,
        "blocks.0.norm.bias": torch.randn(out_dim, generator=g),
        K1: torch.randn(out_dim, in_dim, generator=g) * 0.05,
        "proj_out.weight": torch.randn(8, out_dim, generator=g),
    }
    return {k: v.to(dtype) for k, v in t.items()}


def directions(in_dim=24, m=1, seed=1) -> torch.Tensor:
    return orthonormalize(torch.randn(in_dim, m, generator=torch.Generator().manual_seed(seed)))


def make_delta(
    path: Path,
    tensors: dict[str, torch.Tensor],
    keys=(K, V),
    component="transformer",
    strength=1.0,
    m=1,
    concept="red",
) -> Delta:
    B = directions(tensors[keys[0]].shape[1], m)
    entries = [
        projection_entry(
            f"{component}/{k}",
            tensors[k].float(),
            B,
            strength,
            raw_sha(tensors[k]),
            {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[tensors[k].dtype],
        )
        for k in keys
    ]
    d = Delta(
        entries,
        {"name": concept, "pairs": [["a red ball", "a ball"]]},
        {"name": "cpca", "alpha": 1.0},
    )
    write_delta(path, d)
    return d


def add_delta(path: Path, shape, key=f"transformer/{K}", rank=2, seed=3) -> Delta:
    g = torch.Generator().manual_seed(seed)
    e = DeltaEntry(
        key,
        shape,
        "add",
        1.0,
        torch.randn(shape[0], rank, generator=g) * 0.01,
        torch.randn(shape[1], rank, generator=g),
    )
    d = Delta([e], {"name": "add-test"}, {"name": "manual"})
    write_delta(path, d)
    return d


def save_pipeline(
    root: Path, tensors: dict[str, torch.Tensor], shard: bool = False, variant: bool = False
) -> Path:
    """A diffusers-style folder: model_index.json, transformer/ (our tensors), text_encoder/, scheduler/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "WanPipeline",
                "transformer": ["diffusers", "WanTransformer3DModel"],
                "text_encoder": ["transformers", "UMT5EncoderModel"],
                "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            }
        )
    )
    tr = root / "transformer"
    tr.mkdir()
    (tr / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 2})
    )
    if shard:
        save_sharded(tr, tensors, "diffusion_pytorch_model")
    else:
        save_file(tensors, tr / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    if variant:
        save_file(
            {k: v.to(torch.float16) for k, v in tensors.items()},
            tr / "diffusion_pytorch_model.fp16.safetensors",
            metadata={"format": "pt"},
        )
    te = root / "text_encoder"
    te.mkdir()
    save_file(
        {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(8, 8)},
        te / "model.safetensors",
    )
    (te / "config.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "UniPCMultistepScheduler"})
    )
    (root / "README.md").write_text("# tiny\n")
    return root


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor], stem: str) -> Path:
    """Two tensors per shard, diffusers naming, with an index."""
    keys = list(tensors)
    groups = [keys[i : i + 2] for i in range(0, len(keys), 2)]
    n = len(groups)
    wm = {}
    for i, g in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in g}, folder / name, metadata={"format": "pt"})
        wm.update({k: name for k in g})
    idx = folder / f"{stem}.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    idx.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return idx


@pytest.fixture
def bf16_model(tmp_path):
    t = model_tensors(torch.bfloat16)
    p = tmp_path / "model.safetensors"
    save_file(t, p, metadata={"format": "pt", "note": "keep me"})
    d = make_delta(tmp_path / "red.vud", t)
    return p, tmp_path / "red.vud", t, d


@pytest.fixture(scope="session")
def red_tune():
    """The organism's red recipe captured at text_proj and cross_kv with the twin's token roles,
    and tune's content split of it: (concept, activations, weight reader, split)."""
    from patcher.families.recipes import load_concept
    from patcher.probe import CaptureOptions, WeightReader, capture, open_model
    from patcher.tune.split import Split

    root = Path(__file__).resolve().parents[1] / "examples" / "organism"
    con = load_concept(root / "red.toml")
    opt = CaptureOptions(sites=("text_proj", "cross_kv"), token_roles=True)
    src = open_model(root / "model", opt)
    w = WeightReader(src)
    acts = capture(src, con, opt, w)
    return con, acts, w, Split.of([p.unsafe for p in con.pairs], con.neutral)
