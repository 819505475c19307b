"""Tiny offline instances of the Wan-derived, SkyReels-V2, Cosmos, Allegro and Latte pipelines.

Same conventions as tests/tiny_pipes.py (whose tokenizers and tiny T5 they reuse): each builder
saves a diffusers folder and returns (folder, call_kwargs) that make the pipeline generate a
couple of frames in about a second on CPU. call_kwargs may hold PIL images (the conditioning
inputs of image- and video-conditioned pipelines).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_pipes import _rm, _save, t5_tokenizer, tiny_t5, word_tokenizer

WAN_CALL = {"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 1.0}


def image(rgb=(200, 40, 40), size=16):
    from PIL import Image

    img = Image.new("RGB", (size, size), rgb)
    for i in range(0, size, 3):  # some texture
        img.putpixel((i, i), (0, 0, 0))
    return img


def _wan_vae(z_dim: int = 16, **kw):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        **kw,
    )


def _wan_tr(cls=None, seed: int = 0, **kw):
    """A Wan-shaped transformer (Wan, VACE, Animate, ChronoEdit and SkyReels-V2 share this config)."""
    if cls is None:
        from diffusers import WanTransformer3DModel as cls
    torch.manual_seed(seed)
    args = dict(
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
        rope_max_seq_len=32,
    )
    args.update(kw)
    return cls(**args)


def _clip_vision():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    enc = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            intermediate_size=16,
            patch_size=1,
        )
    ).eval()
    return enc, CLIPImageProcessor(crop_size=16, size=16)


def _text(d: Path) -> dict:
    return {"tokenizer": t5_tokenizer(d / "_tok"), "text_encoder": tiny_t5()}


def _done(pipe, d: Path, call: dict) -> tuple[Path, dict]:
    _save(pipe, d)
    _rm(d / "_tok")
    return d, call


# --------------------------------------------------------------------------- Wan 2.2 TI2V-5B


def wan22_5b(d: Path):
    """Wan 2.2 TI2V-5B's shape: one expert, the 48-channel VAE (patchified 2x2, 16x spatial), expand_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = _wan_vae(
        48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        scale_factor_spatial=16,
    )
    pipe = WanPipeline(
        **_text(d),
        transformer=_wan_tr(in_channels=48, out_channels=48),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        expand_timesteps=True,
    )
    return _done(pipe, d, {**WAN_CALL, "height": 32, "width": 32, "max_sequence_length": 16})


def wan22_5b_i2v(d: Path):
    """TI2V-5B as image-to-video: WanImageToVideoPipeline without an image encoder, expand_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    vae = _wan_vae(
        48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        scale_factor_spatial=16,
    )
    pipe = WanImageToVideoPipeline(
        **_text(d),
        transformer=_wan_tr(in_channels=48, out_channels=48),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        expand_timesteps=True,
    )
    call = {
        **WAN_CALL,
        "height": 32,
        "width": 32,
        "max_sequence_length": 16,
        "image": image(size=32),
    }
    return _done(pipe, d, call)


# --------------------------------------------------------------------------- Wan-derived


def wan_vace(d: Path):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )

    tr = _wan_tr(WanVACETransformer3DModel, vace_layers=[0, 1], vace_in_channels=96)
    pipe = WanVACEPipeline(
        **_text(d),
        transformer=tr,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    video = [image((40 * i, 90, 120)) for i in range(5)]
    return _done(pipe, d, {**WAN_CALL, "max_sequence_length": 16, "video": video})


def chronoedit(d: Path):
    from diffusers import (
        ChronoEditPipeline,
        ChronoEditTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    enc, proc = _clip_vision()
    tr = _wan_tr(ChronoEditTransformer3DModel, in_channels=36, image_dim=4, added_kv_proj_dim=24)
    pipe = ChronoEditPipeline(
        **_text(d),
        transformer=tr,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_encoder=enc,
        image_processor=proc,
    )
    # Wan's I2V attention takes the last 512 context tokens as text: the text must be 512 long
    return _done(pipe, d, {**WAN_CALL, "max_sequence_length": 512, "image": image()})


def wan_animate(d: Path):
    """Wan-Animate: Wan's I2V transformer plus a motion encoder and face adapters (which read face motion)."""
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel

    enc, proc = _clip_vision()
    tr = _wan_tr(
        WanAnimateTransformer3DModel,
        in_channels=36,
        latent_channels=16,
        image_dim=4,
        added_kv_proj_dim=24,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=8,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
        motion_encoder_batch_size=4,
    )
    pipe = WanAnimatePipeline(
        **_text(d),
        transformer=tr,
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True),
        image_encoder=enc,
        image_processor=proc,
    )
    call = {
        "height": 16,
        "width": 16,
        "guidance_scale": 1.0,
        "segment_frame_length": 5,
        "max_sequence_length": 512,  # Wan's I2V attention takes the last 512 context tokens as text
        "image": image(),
        "pose_video": [image((30 * i, 60, 90)) for i in range(5)],
        "face_video": [image((90, 30 * i, 60)) for i in range(5)],
    }
    return _done(pipe, d, call)


def skyreels_v2(d: Path):
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    pipe = SkyReelsV2Pipeline(
        **_text(d),
        transformer=_wan_tr(SkyReelsV2Transformer3DModel),
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True),
    )
    return _done(pipe, d, {**WAN_CALL, "max_sequence_length": 16})


def skyreels_v2_i2v(d: Path):
    from diffusers import (
        SkyReelsV2ImageToVideoPipeline,
        SkyReelsV2Transformer3DModel,
        UniPCMultistepScheduler,
    )

    enc, proc = _clip_vision()
    tr = _wan_tr(SkyReelsV2Transformer3DModel, in_channels=36, image_dim=4, added_kv_proj_dim=24)
    pipe = SkyReelsV2ImageToVideoPipeline(
        **_text(d),
        transformer=tr,
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True),
        image_encoder=enc,
        image_processor=proc,
    )
    return _done(pipe, d, {**WAN_CALL, "max_sequence_length": 512, "image": image()})


def skyreels_v2_df(d: Path, variant: str = ""):
    """The diffusion-forcing pipelines (T2V, and with variant "ImageToVideo" / "VideoToVideo") on the
    same tiny transformer config: they share their components."""
    import diffusers
    from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    cls = getattr(diffusers, f"SkyReelsV2DiffusionForcing{variant}Pipeline")
    pipe = cls(
        **_text(d),
        transformer=_wan_tr(SkyReelsV2Transformer3DModel),
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True),
    )
    call = {**WAN_CALL, "max_sequence_length": 16, "base_num_frames": 5}
    if variant == "ImageToVideo":
        call["image"] = image()
    if variant == "VideoToVideo":
        call["video"] = [image((40 * i, 90, 120)) for i in range(5)]
        call["overlap_history"] = 1  # frames of the given video the extension overlaps
    return _done(pipe, d, call)


def skyreels_v2_df_i2v(d: Path):
    return skyreels_v2_df(d, "ImageToVideo")


def skyreels_v2_df_v2v(d: Path):
    return skyreels_v2_df(d, "VideoToVideo")


# --------------------------------------------------------------------------- Cosmos


class DummySafetyChecker:
    """Cosmos pipelines refuse to run without NVIDIA's guardrail (cosmos_guardrail, not a test dependency);
    this stand-in passes everything. Passed at load time, never saved."""

    def check_text_safety(self, _prompt) -> bool:
        return True

    def check_video_safety(self, video):
        return video

    def to(self, *_a, **_k):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32


def _no_safety_checker_in_index(d: Path) -> None:
    idx = json.loads((d / "model_index.json").read_text())
    idx["safety_checker"] = [None, None]
    (d / "model_index.json").write_text(json.dumps(idx, indent=2))


def _cosmos_tr(**kw):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    args = dict(
        in_channels=16 + 1,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        # the real models concatenate a padding mask, resized with torchvision (not a test dependency);
        # the text path does not depend on it
        concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    )
    args.update(kw)
    return CosmosTransformer3DModel(**args)


def cosmos2(d: Path):
    """Cosmos Predict 2 Video2World (T5 read directly by every attn2)."""
    from diffusers import Cosmos2VideoToWorldPipeline, FlowMatchEulerDiscreteScheduler

    pipe = Cosmos2VideoToWorldPipeline(
        **_text(d),
        transformer=_cosmos_tr(),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=DummySafetyChecker(),
    )
    pipe.safety_checker = None  # not saved: the stand-in is passed at load time
    _done(pipe, d, {})
    _no_safety_checker_in_index(d)
    call = {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "guidance_scale": 1.0,
        "max_sequence_length": 16,
        "image": image(),
    }
    return d, call


def cosmos2_t2i(d: Path):
    """Cosmos Predict 2 Text2Image: the same transformer class and T5 encoding as Video2World."""
    from diffusers import Cosmos2TextToImagePipeline, FlowMatchEulerDiscreteScheduler

    pipe = Cosmos2TextToImagePipeline(
        **_text(d),
        transformer=_cosmos_tr(in_channels=16),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=DummySafetyChecker(),
    )
    pipe.safety_checker = None
    _done(pipe, d, {})
    _no_safety_checker_in_index(d)
    return d, {"height": 16, "width": 16, "guidance_scale": 1.0, "max_sequence_length": 16}


def qwen25_vl(hidden: int = 16, layers: int = 2):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=24,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=1000,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            max_position_embeddings=1024,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=8,
            intermediate_size=8,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            fullatt_block_indexes=[0],
        ),
        vocab_size=1000,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %} <|im_end|> {% endfor %}"
)


def chat_tokenizer():
    """A word-level tokenizer with a chat template: Cosmos 2.5 encodes prompts through apply_chat_template."""
    tok = word_tokenizer(max_len=512)
    tok.add_tokens(["<|im_start|>", "<|im_end|>", "system", "user", "You", "are", "helpful"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def cosmos25(d: Path):
    """Cosmos Predict 2.5: a Qwen2.5-VL text encoder, every layer normalised and concatenated, crossattn_proj."""
    from diffusers import Cosmos2_5_PredictBasePipeline, UniPCMultistepScheduler

    layers, hidden = 2, 16
    tr = _cosmos_tr(
        use_crossattn_projection=True,
        crossattn_proj_in_channels=layers * hidden,
        encoder_hidden_states_channels=32,
    )
    pipe = Cosmos2_5_PredictBasePipeline(
        text_encoder=qwen25_vl(hidden, layers),
        tokenizer=chat_tokenizer(),
        transformer=tr,
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(flow_shift=1.0, use_flow_sigmas=True),
        safety_checker=DummySafetyChecker(),
    )
    pipe.safety_checker = None
    _done(pipe, d, {})
    _no_safety_checker_in_index(d)
    call = {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "guidance_scale": 1.0,
        "max_sequence_length": 48,  # the chat template's system turn alone is about 20 tokens
    }
    return d, call


# --------------------------------------------------------------------------- PixArt-style


def allegro(d: Path):
    from diffusers import (
        AllegroPipeline,
        AllegroTransformer3DModel,
        AutoencoderKLAllegro,
        DDIMScheduler,
    )

    torch.manual_seed(0)
    tr = AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=24,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        caption_channels=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLAllegro(
        in_channels=3,
        out_channels=3,
        down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = AllegroPipeline(**_text(d), transformer=tr, vae=vae, scheduler=DDIMScheduler())
    call = {
        "height": 16,
        "width": 16,
        "num_frames": 8,
        "guidance_scale": 1.0,
        "max_sequence_length": 16,
    }
    return _done(pipe, d, call)


def latte(d: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    tr = LatteTransformer3DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    pipe = LattePipeline(**_text(d), transformer=tr, vae=vae, scheduler=DDIMScheduler())
    call = {
        "height": 16,
        "width": 16,
        "video_length": 2,
        "guidance_scale": 1.0,
    }
    return _done(pipe, d, call)


BUILDERS = {
    "wan22_5b": wan22_5b,
    "wan22_5b_i2v": wan22_5b_i2v,
    "wan_vace": wan_vace,
    "chronoedit": chronoedit,
    "wan_animate": wan_animate,
    "skyreels_v2": skyreels_v2,
    "skyreels_v2_i2v": skyreels_v2_i2v,
    "skyreels_v2_df": skyreels_v2_df,
    "skyreels_v2_df_i2v": skyreels_v2_df_i2v,
    "skyreels_v2_df_v2v": skyreels_v2_df_v2v,
    "cosmos2": cosmos2,
    "cosmos2_t2i": cosmos2_t2i,
    "cosmos25": cosmos25,
    "allegro": allegro,
    "latte": latte,
}
