"""Tiny offline instances of the LLM-conditioned video pipelines (LTX-2, HunyuanVideo 1.5, Kandinsky 5,
Sana-Video), saved as diffusers folders.

Sizes follow diffusers' own fast tests, shrunk further (hidden 8-32, 1-2 layers); tokenizers are the
offline word-level one from tests/tiny_pipes.py. Each builder returns (folder, call_kwargs) where
call_kwargs make the pipeline generate a few frames in about a second on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_pipes import _save, word_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['role'] == 'system' %}{{ 'filler ' * FILL }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def llm_tokenizer(max_len: int = 512, chat: bool = False, padding_side: str = "right"):
    """The word-level tokenizer with the special tokens LLM pipelines expect (and a chat template)."""
    tok = word_tokenizer(max_len)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.padding_side = padding_side
    if chat:
        tok.chat_template = CHAT_TEMPLATE.replace("FILL", "0")
    return tok


def pad_chat_prefix(tok, system: str, crop_start: int) -> None:
    """Pad the system turn so that the template's tokens before the user's prompt number exactly
    ``crop_start``, as the real tokenizer's do (the pipeline crops that many)."""
    msgs = [[{"role": "system", "content": system}, {"role": "user", "content": "dance"}]]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"][0]
    n = ids.index(tok.convert_tokens_to_ids("dance"))
    assert n <= crop_start, n
    tok.chat_template = CHAT_TEMPLATE.replace("FILL", str(crop_start - n))


def sana_video(d: Path, i2v: bool = False):
    from diffusers import (
        AutoencoderKLWan,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        SanaImageToVideoPipeline,
        SanaVideoPipeline,
        SanaVideoTransformer3DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    tok = llm_tokenizer()
    torch.manual_seed(0)
    te = Gemma2Model(
        Gemma2Config(
            head_dim=8,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=0,
            attn_implementation="eager",
        )
    ).eval()
    torch.manual_seed(0)
    tr = SanaVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        mlp_ratio=2.0,
        attention_bias=False,
        sample_size=8,
        patch_size=(1, 2, 2),
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    cls = SanaImageToVideoPipeline if i2v else SanaVideoPipeline
    sched = FlowMatchEulerDiscreteScheduler() if i2v else DPMSolverMultistepScheduler()
    pipe = cls(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)
    _save(pipe, d)
    return d, {
        "height": 32,
        "width": 32,
        "frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
        "use_resolution_binning": False,
    }


BUILDERS = {"sana_video": sana_video}


def tiny_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "vocab_size": 1024,
            "sliding_window": 8,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 4,
        },
        mm_tokens_per_image=4,
        image_token_index=3,
        boi_token_index=1,
        eoi_token_index=2,
    )
    return Gemma3ForConditionalGeneration(cfg).eval()


def ltx2(d: Path, kind: str = "t2v"):
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2ConditionPipeline,
        LTX2ImageToVideoPipeline,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tok = llm_tokenizer(padding_side="left")
    te = tiny_gemma3()
    hidden, layers = te.config.text_config.hidden_size, te.config.text_config.num_hidden_layers
    torch.manual_seed(0)
    tr = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=1,
        qk_norm="rms_norm_across_heads",
        caption_channels=hidden,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=hidden,
        text_proj_in_factor=layers + 1,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=8,  # as the real model: registers fill the padding
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=8,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    cls = {"t2v": LTX2Pipeline, "i2v": LTX2ImageToVideoPipeline, "cond": LTX2ConditionPipeline}[
        kind
    ]
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=te,
        tokenizer=tok,
        connectors=connectors,
        transformer=tr,
        vocoder=vocoder,
    )
    _save(pipe, d)
    return d, {
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "frame_rate": 25.0,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
        "audio_guidance_scale": 1.0,
        "stg_scale": 0.0,
        "audio_stg_scale": 0.0,
        "modality_scale": 1.0,
        "audio_modality_scale": 1.0,
        "guidance_rescale": 0.0,
        "audio_guidance_rescale": 0.0,
        "spatio_temporal_guidance_blocks": None,
        "use_cross_timestep": False,
    }


BUILDERS["ltx2"] = ltx2


def hunyuan15(d: Path, i2v: bool = False):
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        T5Config,
        T5EncoderModel,
    )

    tok = llm_tokenizer(max_len=2048, chat=True)
    torch.manual_seed(0)
    tr = HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="i2v" if i2v else "t2v",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    torch.manual_seed(0)
    te = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tok),
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
        )
    ).eval()
    torch.manual_seed(0)
    te2 = T5EncoderModel(
        T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).eval()
    pipe = HunyuanVideo15Pipeline(
        transformer=tr,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
    )
    pad_chat_prefix(tok, pipe.system_message, pipe.prompt_template_encode_start_idx)
    _save(pipe, d)
    return d, {"height": 16, "width": 16, "num_frames": 5}


BUILDERS["hunyuan15"] = hunyuan15


def kandinsky5(d: Path):
    """Kandinsky 5 T2V. The tokenizer is the plain offline one rather than a Qwen2VLProcessor (whose
    video processor needs torchvision): for text-only prompts the processor only forwards the text to
    its tokenizer. A short preamble makes the template's prefix exactly the pipeline's crop (128)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )
    from tokenizers import processors
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tests.tiny_pipes import clip_tokenizer, tiny_clip_text

    tok = llm_tokenizer(1024)
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    te = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_scaling": {
                    "mrope_section": [1, 1, 2],
                    "rope_type": "default",
                    "type": "default",
                },
                "rope_theta": 1000000.0,
                "vocab_size": len(tok),
                "bos_token_id": None,
                "eos_token_id": 1,
                "pad_token_id": 0,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            hidden_size=16,
            vocab_size=len(tok),
        )
    ).eval()
    te2 = tiny_clip_text(8)
    torch.manual_seed(0)
    tr = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=24,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=1,
        axes_dims=(4, 4, 4),
        visual_cond=False,
    )
    pipe = Kandinsky5T2VPipeline(
        transformer=tr.eval(),
        vae=vae.eval(),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(d / "_clip_tok"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    prefix = pipe.prompt_template.split("{}")[0]
    n = len(tok(prefix)["input_ids"]) - 1  # without the closing </s>
    k = pipe.prompt_template_encode_start_idx - n
    assert k >= 0, n
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(["<s>"] * k + ["$A", "</s>"]), special_tokens=[("<s>", 3), ("</s>", 1)]
    )
    _save(pipe, d)
    import shutil

    shutil.rmtree(d / "_clip_tok", ignore_errors=True)
    return d, {
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


BUILDERS["kandinsky5"] = kandinsky5
