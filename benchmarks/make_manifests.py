"""Write the key/shape manifests of real-size denoisers (built on the meta device: no weights, no download).

    python benchmarks/make_manifests.py        # needs diffusers; the output is committed

probe_bench.py reads these so that it can lay out real-size checkpoints on machines without diffusers.
The configs are those of the official conversion scripts; for LTX-2 and HunyuanVideo 1.5 they are the
model classes' own defaults in diffusers 0.42.1 (an empty dict below; the manifest records them in full),
which are the released sizes: 18.88B (LTX-2, video and audio streams) and 8.33B (HunyuanVideo 1.5, whose
T2V and I2V transformers have the same keys). opensora2.json is not written here: it comes from the
upstream model (tests/data/make_opensora2_golden.py --manifest), as there is no diffusers class for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = {
    "wan2.1-t2v-1.3b": (
        "WanTransformer3DModel",
        "WanPipeline",
        dict(
            patch_size=[1, 2, 2],
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        ),
    ),
    "wan2.1-t2v-14b": (
        "WanTransformer3DModel",
        "WanPipeline",
        dict(
            patch_size=[1, 2, 2],
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        ),
    ),
    "cogvideox-5b": (
        "CogVideoXTransformer3DModel",
        "CogVideoXPipeline",
        dict(
            num_attention_heads=48,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            text_embed_dim=4096,
            num_layers=42,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            time_embed_dim=512,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
    ),
    "ltx2-19b": ("LTX2VideoTransformer3DModel", "LTX2Pipeline", {}),
    "hunyuanvideo1.5-8.3b": ("HunyuanVideo15Transformer3DModel", "HunyuanVideo15Pipeline", {}),
}


def main() -> None:
    import diffusers

    out = Path(__file__).resolve().parent / "manifests"
    for name, (cls, pipe, cfg) in CONFIGS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**cfg)
        tensors = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        doc = {
            "class": cls,
            "pipeline": pipe,
            "config": cfg or {k: v for k, v in model.config.items() if not k.startswith("_")},
            "diffusers": diffusers.__version__,
            "params": sum(int(torch.Size(s).numel()) for _k, s in tensors),
            "tensors": tensors,
        }
        (out / f"{name}.json").write_text(json.dumps(doc, separators=(",", ":")))
        print(name, doc["params"] / 1e9, "B params,", len(tensors), "tensors")


if __name__ == "__main__":
    main()
