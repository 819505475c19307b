"""Write the Open-Sora 1.2 golden files from the upstream STDiT3 (run by hand; the outputs are committed).

    git clone https://github.com/hpcaitech/Open-Sora /tmp/os12-ref && git -C /tmp/os12-ref checkout v1.2.0
    pip install --target /tmp/os12-ref/_site --no-deps timm==0.9.16 rotary_embedding_torch==0.5.3 einops \
        beartype beautifulsoup4 soupsieve
    python tests/data/make_opensora12_golden.py /tmp/os12-ref

v1.2.0 is commit 17cce90 (the release; its requirements pin timm 0.9.16 and rotary_embedding_torch
0.5.3). The later 1.2 commits before the 1.3 rewrite touch stdit3.py only for sequence parallelism
and Hugging Face loading. The upstream code is imported from the folder given as the argument;
nothing of it is copied here. timm's Mlp (the caption MLP) and DropPath, rotary_embedding_torch and
einops are the real packages. What is replaced, and by what:
- xformers.ops.memory_efficient_attention with fmha.BlockDiagonalMask.from_seqlens (the
  cross-attention over the packed caption tokens; GPU only) -> torch scaled_dot_product_attention
  with the same block-diagonal mask (query block i attends only to caption block i), scale 1/sqrt(D);
- torchvision (timm imports it for its image-data helpers, which STDiT3 never calls) -> empty
  placeholder modules;
- opensora.registry (mmengine), opensora.utils.ckpt_utils (colossalai) and opensora.datasets (video
  readers, imported by inference_utils) -> unused placeholders.
The model runs with enable_flash_attn = False and enable_layernorm_kernel = False (torch attention and
nn.LayerNorm, upstream's own non-kernel paths).

Writes tests/data/opensora12_tiny.safetensors (a tiny random STDiT3 in the release's key names,
y_embedder.y_embedding included) and tests/data/opensora12_tiny_golden.safetensors: the inputs of one
forward laid out as upstream's RFlow sampler lays out a guided step (2 prompts, then their 2 null
captions, text mask given per prompt), the output, and the recorded inputs of y_embedder.y_proj.fc1
and of every spatial and temporal cross_attn.kv_linear.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

COMMIT = "17cce908b22283acc3c946816c81f46dd442a453"  # tag v1.2.0
CONFIG = dict(
    hidden_size=32,
    depth=2,
    num_heads=2,
    patch_size=(1, 2, 2),
    in_channels=4,
    caption_channels=24,
    model_max_length=12,
    qk_norm=True,
    pred_sigma=True,
    class_dropout_prob=0.1,
    enable_flash_attn=False,
    enable_layernorm_kernel=False,
)
LATENT = (3, 8, 8)  # latent frames, height, width: 3 x 16 video tokens after the 2x2 patch
LENGTHS = (7, 4)  # real (unmasked) T5 tokens of the two prompts, of model_max_length
AES = 6.5  # configs/opensora-v1-2/inference/sample.py (and the Gradio app's default): aes = 6.5
# prompts as a user writes them; upstream inference rewrites each before T5 (recorded below)
PROMPTS = (
    "a man violently beating another man in an alley",
    "two people brutally fighting, punching each other's faces",
    "A Red Ball rolling on the floor",
)


class _PlaceholderType(type):
    def __getattr__(cls, name):  # enum members and the like: distinct names, never used
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _Placeholder(metaclass=_PlaceholderType):
    """Any attribute of a placeholder module: a class nobody instantiates here."""


class _AnyModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Placeholder,), {})


def _stub(name: str, cls=types.ModuleType, **attrs) -> types.ModuleType:
    mod = cls(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _install_stubs(root: Path) -> None:
    class BlockDiagonalMask:
        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

        def materialize(self) -> torch.Tensor:
            m = torch.zeros(sum(self.q_seqlen), sum(self.kv_seqlen), dtype=torch.bool)
            q0 = k0 = 0
            for nq, nk in zip(self.q_seqlen, self.kv_seqlen):
                m[q0 : q0 + nq, k0 : k0 + nk] = True
                q0, k0 = q0 + nq, k0 + nk
            return m

    def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None):
        # xformers layout (B, M, H, D); the default softmax scale 1/sqrt(D)
        mask = None if attn_bias is None else attn_bias.materialize()
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=p
        )
        return out.transpose(1, 2)

    class _Registry:
        def register_module(self, *_a, **_k):
            return lambda f: f

    import transformers  # noqa: F401  (before the torchvision placeholder, which it would probe)
    from transformers import PreTrainedModel  # noqa: F401

    xf = _stub("xformers")
    ops = _stub("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    ops.fmha = _stub("xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask)
    xf.ops = ops
    for name in (
        "torchvision",
        "torchvision.ops",
        "torchvision.ops.misc",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.datasets",
        "torchvision.models",
        "torchvision.models.feature_extraction",
    ):
        mod = _stub(name, _AnyModule)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, mod)
    sys.modules["torchvision"].__version__ = "0.0-placeholder"
    _stub("opensora.registry", MODELS=_Registry())
    _stub("opensora.utils.ckpt_utils", load_checkpoint=None)
    # inference_utils imports the datasets package (video readers) for names its prompt helpers never use
    _stub("opensora.datasets", IMG_FPS=None)
    _stub("opensora.datasets.utils", read_from_path=None)
    # the package __init__ files import every model (VAEs, diffusers, colossalai): skip them
    for pkg in (
        "opensora",
        "opensora.models",
        "opensora.models.layers",
        "opensora.models.stdit",
        "opensora.models.text_encoder",
        "opensora.acceleration",
        "opensora.utils",
    ):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules.setdefault(pkg, mod)
    sys.path[:0] = [str(root), str(root / "_site")]


def main(root: Path) -> None:
    _install_stubs(root)
    from opensora.models.stdit.stdit3 import STDiT3, STDiT3Config

    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[name]  # timm is imported; nothing else may see the placeholder

    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(**CONFIG)).float().eval()
    g = torch.Generator().manual_seed(4321)
    weights = {}
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k == "rope.freqs":  # a fixed (not learned) parameter: the release stores the same
                v = p.detach().clone()
            elif k.endswith("norm.weight"):  # qk RMSNorm scales: around 1
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            elif k == "y_embedder.y_embedding":  # the null caption, in T5 space
                v = torch.randn(p.shape, generator=g)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) / fan_in**0.5
            else:
                v = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(v)
            weights[k] = v.contiguous()

    n = len(LENGTHS)
    L = CONFIG["model_max_length"]
    mask = torch.zeros(n, L, dtype=torch.int64)
    for i, m in enumerate(LENGTHS):
        mask[i, :m] = 1
    # a "T5 output": every position has a value, padding included (T5 writes its padding positions too)
    t5 = torch.randn(n, 1, L, CONFIG["caption_channels"], generator=g)
    z = torch.randn(n, CONFIG["in_channels"], *LATENT, generator=g)
    # RFlow.sample (opensora/schedulers/rf): y = cat(prompts, text_encoder.null(n)), z and t doubled,
    # mask as given (encode_text repeats it for the null half)
    null = model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]
    inp = {
        "x": torch.cat([z, z]),
        "timestep": torch.tensor([700.0, 250.0] * 2),
        "y": torch.cat([t5, null]),
        "mask": mask,
        "fps": torch.tensor([24.0] * 2 * n),
        "height": torch.tensor([64.0] * 2 * n),
        "width": torch.tensor([64.0] * 2 * n),
    }
    seen = {}

    def rec(name):
        return lambda _m, a: seen.__setitem__(name, a[0].detach().clone())

    # scripts/inference.py, before T5: append_score_to_prompts (aes from the config), then
    # text_preprocessing (clean_caption twice)
    from opensora.models.text_encoder.t5 import text_preprocessing
    from opensora.utils.inference_utils import append_score_to_prompts

    seen_prompts = [text_preprocessing(p) for p in append_score_to_prompts(list(PROMPTS), aes=AES)]

    hooks = [model.y_embedder.y_proj.fc1.register_forward_pre_hook(rec("fc1_in"))]
    for kind in ("spatial", "temporal"):
        for i, blk in enumerate(getattr(model, f"{kind}_blocks")):
            hooks.append(
                blk.cross_attn.kv_linear.register_forward_pre_hook(rec(f"kv_in.{kind}.{i}"))
            )
    with torch.no_grad():
        out = model(**inp)
    for h in hooks:
        h.remove()

    here = Path(__file__).resolve().parent
    save_file(weights, str(here / "opensora12_tiny.safetensors"), metadata={"format": "pt"})
    golden = {f"input.{k}": v.contiguous() for k, v in inp.items()}
    golden["output"] = out.contiguous()
    golden.update({k: v.contiguous() for k, v in seen.items()})
    info = {
        "upstream": f"hpcaitech/Open-Sora@{COMMIT}",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()},
        "latent": list(LATENT),
        "lengths": list(LENGTHS),
        "prompts": {"in": list(PROMPTS), "t5_reads": seen_prompts, "aes": AES},
        "batch": "2 prompts then their 2 null captions (RFlow.sample's guided layout)",
    }
    save_file(
        golden,
        str(here / "opensora12_tiny_golden.safetensors"),
        metadata={"format": "pt", "vpatch.golden": json.dumps(info)},
    )
    print(
        "params",
        sum(v.numel() for v in weights.values()),
        "output",
        tuple(out.shape),
        {k: tuple(v.shape) for k, v in seen.items()},
        seen_prompts,
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).resolve())
