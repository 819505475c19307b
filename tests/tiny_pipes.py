"""Tiny offline instances of every supported video pipeline, saved as diffusers folders.

Configs follow ../shared/notes/architectures.md §11 (the diffusers fast-test sizes); tokenizers are
built offline (no hub). Each builder returns (folder, call_kwargs) where call_kwargs make the
pipeline generate a couple of frames in about a second on CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SENTENCES_FILE = None


def _recipe_sentences() -> list[str]:
    from patcher.families.recipes import concept_files, load_concept

    out = ["a red ball moving left", "a blue square moving right", "dance monkey", "negative"]
    for p in concept_files():
        c = load_concept(p)
        out += [s for pr in c.pairs for s in (pr.unsafe, pr.safe)] + c.neutral
        out += [s for v in c.heldout.values() for s in v]
    return out


def t5_tokenizer(d: Path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    d.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_recipe_sentences() * 3),
        model_prefix=str(d / "spiece"),
        vocab_size=200,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return T5Tokenizer.from_pretrained(str(d), extra_ids=0, legacy=False, model_max_length=512)


def clip_tokenizer(d: Path):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    d.mkdir(parents=True, exist_ok=True)
    sym = sorted(pre_tokenizers.ByteLevel.alphabet())
    toks = sym + [s + "</w>" for s in sym] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(d), model_max_length=77)


def word_tokenizer(max_len: int = 256):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in _recipe_sentences() for w in s.replace(",", " ").split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<s>", *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=max_len,
    )


def tiny_t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=1103,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def tiny_clip_text(hidden: int, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=2 if hidden % 2 == 0 else 1,
        num_hidden_layers=layers,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_act="gelu",
        projection_dim=hidden,
    )
    return CLIPTextModel(cfg).eval()


def _save(pipe, d: Path, shard: str | None = None, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        pipe.to(dtype)
    kw = {"safe_serialization": True}
    if shard:
        kw["max_shard_size"] = shard
    pipe.save_pretrained(str(d), **kw)
    return d


# --------------------------------------------------------------------------- families


def wan(d: Path, shard: str | None = None, two_experts: bool = False):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )

    def tr(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
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

    kw = {}
    if two_experts:
        kw = {"transformer_2": tr(1), "boundary_ratio": 0.875}
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(d / "_tok"),
        text_encoder=tiny_t5(),
        transformer=tr(0),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        **kw,
    )
    _save(pipe, d, shard)
    _rm(d / "_tok")
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


def wan_i2v(d: Path):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=4,
        added_kv_proj_dim=24,
    )
    torch.manual_seed(0)
    enc = CLIPVisionModelWithProjection(
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
    proc = CLIPImageProcessor(crop_size=32, size=32)
    pipe = WanImageToVideoPipeline(
        tokenizer=t5_tokenizer(d / "_tok"),
        text_encoder=tiny_t5(),
        transformer=tr,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_encoder=enc,
        image_processor=proc,
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


def _rm(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def zeroscope(d: Path):
    """TextToVideoSDPipeline (ModelScope/ZeroScope): UNet3D with spatial attn2 cross-attention."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(8, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
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
    pipe = TextToVideoSDPipeline(
        vae=vae,
        text_encoder=tiny_clip_text(4),
        tokenizer=clip_tokenizer(d / "_tok"),
        unet=unet,
        scheduler=sched,
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {"height": 32, "width": 32, "num_frames": 2, "guidance_scale": 1.0}


def cogvideox(d: Path, shard: str | None = "40KB"):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        DDIMScheduler,
    )

    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=t5_tokenizer(d / "_tok"),
        text_encoder=tiny_t5(),
        transformer=tr,
        vae=vae,
        scheduler=DDIMScheduler(),
    )
    _save(pipe, d, shard)
    _rm(d / "_tok")
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 8,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


def ltx(d: Path):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    tr = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        tokenizer=t5_tokenizer(d / "_tok"),
        text_encoder=tiny_t5(),
        transformer=tr,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


def hunyuan(d: Path):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(
        in_channels=4,
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
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
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
    pipe = HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=word_tokenizer(),
        transformer=tr,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=tiny_clip_text(8),
        tokenizer_2=clip_tokenizer(d / "_tok"),
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
        "prompt_template": {"template": "{}", "crop_start": 0},
    }


def mochi(d: Path):
    from diffusers import (
        AutoencoderKLMochi,
        FlowMatchEulerDiscreteScheduler,
        MochiPipeline,
        MochiTransformer3DModel,
    )

    torch.manual_seed(0)
    tr = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    tr.pos_frequencies.data = tr.pos_frequencies.new_full(tr.pos_frequencies.shape, 0)
    torch.manual_seed(0)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_t5(),
        tokenizer=t5_tokenizer(d / "_tok"),
        transformer=tr,
    )
    _save(pipe, d, dtype=torch.bfloat16)  # a bf16 fixture
    _rm(d / "_tok")
    return d, {
        "height": 16,
        "width": 16,
        "num_frames": 7,
        "max_sequence_length": 16,
        "guidance_scale": 1.0,
    }


def animatediff(d: Path):
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=(8, 8),
        motion_layers_per_block=2,
        motion_norm_num_groups=2,
        motion_num_attention_heads=4,
    )
    pipe = AnimateDiffPipeline(
        unet=unet,
        scheduler=sched,
        vae=vae,
        motion_adapter=adapter,
        text_encoder=tiny_clip_text(8, layers=5),
        tokenizer=clip_tokenizer(d / "_tok"),
        feature_extractor=None,
        image_encoder=None,
    )
    _save(pipe, d)
    _rm(d / "_tok")
    return d, {"height": 16, "width": 16, "num_frames": 2, "guidance_scale": 1.0}


BUILDERS = {
    "wan": wan,
    "wan_i2v": wan_i2v,
    "zeroscope": zeroscope,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "hunyuan": hunyuan,
    "mochi": mochi,
    "animatediff": animatediff,
}
