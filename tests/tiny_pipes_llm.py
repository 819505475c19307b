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
        tok.chat_template = CHAT_TEMPLATE
    return tok


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
