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
    clip_tokenizer,
    t5_tokenizer,
    tiny_clip_text,
    tiny_t5,
    word_tokenizer,
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


def helios_pyramid(d: Path):
    return helios(d, pyramid=True)


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
    call = {
        "height": 16,
        "width": 16,
        "num_frames": 9,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }
    if pyramid:  # the pyramid pipeline takes steps per stage instead of num_inference_steps
        call["pyramid_num_inference_steps_list"] = [2]
    return d, call


def motif(d: Path, image: bool = False):
    """MotifVideoPipeline / MotifVideoImage2VideoPipeline: T5Gemma2 encoder (with a SigLIP vision tower
    for I2V), dual- and single-stream blocks; text enters through context_embedder."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        MotifVideoImage2VideoPipeline,
        MotifVideoPipeline,
        MotifVideoTransformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import (
        SiglipImageProcessor,
        SiglipVisionConfig,
        T5Gemma2Encoder,
        T5Gemma2EncoderConfig,
        T5Gemma2TextConfig,
    )

    torch.manual_seed(0)
    text = T5Gemma2TextConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=1104,
        max_position_embeddings=128,
        head_dim=16,
        num_key_value_heads=2,
        dropout_rate=0.0,
    )
    kw = {}
    if image:
        kw["vision_config"] = SiglipVisionConfig(
            hidden_size=4,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_channels=3,
        )
    enc = T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text, **kw)).eval()
    torch.manual_seed(0)
    tr = MotifVideoTransformer3DModel(
        in_channels=33,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        num_single_layers=1,
        mlp_ratio=4.0,
        patch_size=1,
        patch_size_t=1,
        qk_norm="rms_norm",
        text_embed_dim=32,
        image_embed_dim=4 if image else None,
        rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    )
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=_wan_vae(),
        text_encoder=enc,
        tokenizer=t5_tokenizer(d / "_tok"),
        transformer=tr,
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
    )
    call = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16}
    if image:
        from PIL import Image

        parts["feature_extractor"] = SiglipImageProcessor(
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size={"height": 16, "width": 16}
        )
        pipe = MotifVideoImage2VideoPipeline(**parts)
        call["image"] = Image.new("RGB", (16, 16), (200, 40, 40))
    else:
        pipe = MotifVideoPipeline(**parts)
    _save(pipe, d)
    _rm(d / "_tok")
    return d, call


def motif_i2v(d: Path):
    return motif(d, image=True)


def i2vgenxl(d: Path):
    """I2VGenXLPipeline: UNet3D-style I2VGenXLUNet, CLIP text + CLIP image; attn2 reads [text | image tokens]."""
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLPipeline
    from diffusers.models.unets import I2VGenXLUNet
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = I2VGenXLUNet(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4,
        attention_head_dim=4,
        num_attention_heads=None,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=32,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=1,
        )
    ).eval()
    pipe = I2VGenXLPipeline(
        vae=vae,
        text_encoder=tiny_clip_text(4, layers=3),
        tokenizer=clip_tokenizer(d / "_tok"),
        image_encoder=image_encoder,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
        ),
    )
    _save(pipe, d)
    _rm(d / "_tok")
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    return d, {"image": img, "height": 32, "width": 32, "num_frames": 2, "guidance_scale": 1.0}


def _hunyuan_text_parts(d: Path) -> dict:
    """HunyuanVideo's text side as tests/tiny_pipes.py builds it: a 2-layer Llama (16 wide) with a word
    tokenizer, and CLIP (8 wide) for the pooled vector."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    llama = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    return dict(
        text_encoder=llama,
        tokenizer=word_tokenizer(),
        text_encoder_2=tiny_clip_text(8),
        tokenizer_2=clip_tokenizer(d / "_tok"),
    )


def _hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


TINY_TEMPLATE = {
    "template": "{}",
    "crop_start": 0,
}  # the tiny word tokenizer cannot spell the chat template


def framepack(d: Path):
    """HunyuanVideoFramepackPipeline: HunyuanVideo's text side and token refiner, SigLIP image tokens."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoFramepackPipeline,
        HunyuanVideoFramepackTransformer3DModel,
    )
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tr = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=8,
        has_clean_x_embedder=True,
    )
    torch.manual_seed(0)
    siglip = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    pipe = HunyuanVideoFramepackPipeline(
        transformer=tr,
        vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_encoder=siglip,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        **_hunyuan_text_parts(d),
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "image": Image.new("RGB", (32, 32), (200, 40, 40)),
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "latent_window_size": 3,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
        "prompt_template": TINY_TEMPLATE,
    }


def skyreels_i2v(d: Path):
    """HunyuanSkyreelsImageToVideoPipeline: HunyuanVideo with the image latent concatenated to the noise."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from PIL import Image

    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(
        in_channels=8,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    pipe = HunyuanSkyreelsImageToVideoPipeline(
        transformer=tr,
        vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        **_hunyuan_text_parts(d),
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "image": Image.new("RGB", (16, 16), (200, 40, 40)),
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
        "true_cfg_scale": 1.0,
        "prompt_template": TINY_TEMPLATE,
    }


# HunyuanVideo I2V's chat template in miniature: the image token inside the system turn, the prompt in
# the user turn, the assistant header cropped; the same crop and image-token arithmetic as the real one
HY_I2V_TEMPLATE = {
    "template": "<|start_header_id|>system<|end_header_id|><image>describe<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
    "crop_start": 9,  # tokens before the prompt
    "image_emb_start": 3,
    "image_emb_end": 19,
    "image_emb_len": 16,  # (32 / 8)^2 patches of the tiny CLIP vision tower
}


def hunyuan_i2v(d: Path):
    """HunyuanVideoImageToVideoPipeline: a LLaVA text encoder reads the image inside the prompt."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from PIL import Image
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = word_tokenizer()
    special = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=8,
                intermediate_size=37,
                projection_dim=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
            ),
            text_config=LlamaConfig(
                hidden_size=16,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=3,
                vocab_size=1000,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=0,
            ),
            pad_token_id=0,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
        )
    ).eval()
    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=False,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
        image_condition_type="latent_concat",
    )
    parts = _hunyuan_text_parts(d)
    parts.update(text_encoder=llava, tokenizer=tok)
    pipe = HunyuanVideoImageToVideoPipeline(
        transformer=tr,
        vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
        **parts,
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "image": Image.new("RGB", (16, 16), (200, 40, 40)),
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
        "prompt_template": HY_I2V_TEMPLATE,
    }


def easyanimate(d: Path):
    """EasyAnimatePipeline: Qwen2-VL text (chat template, hidden_states[-2]) into text_proj, then MMDiT-style
    joint blocks."""
    from diffusers import (
        AutoencoderKLMagvit,
        EasyAnimatePipeline,
        EasyAnimateTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from tests.tiny_pipes_llm import llm_tokenizer

    torch.manual_seed(0)
    tr = EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # 3-D RoPE splits the head 2:3:3, so 8 would give odd parts
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=16,
        num_layers=1,
        sample_width=16,
        sample_height=16,
        patch_size=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLMagvit(
        in_channels=3,
        out_channels=3,
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        spatial_group_norm=False,
    )
    torch.manual_seed(0)
    qwen = Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=1000,
                max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                bos_token_id=3,
                eos_token_id=1,
                pad_token_id=0,
            ),
            vision_config=dict(
                depth=1,
                embed_dim=8,
                hidden_size=16,
                num_heads=2,
                mlp_ratio=2,
                patch_size=2,
                spatial_merge_size=1,
                temporal_patch_size=1,
            ),
            bos_token_id=3,
            eos_token_id=1,
            pad_token_id=0,
        )
    ).eval()
    pipe = EasyAnimatePipeline(
        vae=vae,
        text_encoder=qwen,
        tokenizer=llm_tokenizer(chat=True),
        transformer=tr,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    _save(pipe, d)
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "guidance_scale": 1.0,
    }


BUILDERS = {
    "helios": helios,
    "helios_pyramid": helios_pyramid,
    "motif": motif,
    "motif_i2v": motif_i2v,
    "i2vgenxl": i2vgenxl,
    "framepack": framepack,
    "skyreels_i2v": skyreels_i2v,
    "hunyuan_i2v": hunyuan_i2v,
    "easyanimate": easyanimate,
}
