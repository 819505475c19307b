"""Tiny offline instances of the further video pipelines (issue 12, part 2), saved as diffusers folders.

Sizes follow the diffusers fast tests of each pipeline; tokenizers are built offline with the helpers
of tests/tiny_pipes.py. Each builder returns (folder, call_kwargs) like the builders there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_pipes import (
    _rm,
    _save,
    t5_tokenizer,
    tiny_t5,
)


def _wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def helios(d: Path, pyramid: bool = False):
    """HeliosPipeline (or HeliosPyramidPipeline): a Wan-shaped DiT with UMT5 text, history memory patches."""
    from diffusers import (
        HeliosPipeline,
        HeliosPyramidPipeline,
        HeliosScheduler,
        HeliosTransformer3DModel,
    )

    torch.manual_seed(0)
    tr = HeliosTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=True,
        guidance_cross_attn=True,
        zero_history_timestep=True,
        is_amplify_history=False,
    )
    cls = HeliosPyramidPipeline if pyramid else HeliosPipeline
    sched = HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True)
    pipe = cls(
        tokenizer=t5_tokenizer(d / "_tok"),
        text_encoder=tiny_t5(),
        transformer=tr,
        vae=_wan_vae(),
        scheduler=sched,
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 9,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


BUILDERS = {"helios": helios}
