"""Write the Open-Sora 2.0 golden files from the upstream MMDiT (run by hand; the outputs are committed).

    git clone https://github.com/hpcaitech/Open-Sora /tmp/opensora-ref && git -C /tmp/opensora-ref checkout 7ad6a96
    pip install --target /tmp/opensora-ref/_site einops
    python tests/data/make_opensora2_golden.py /tmp/opensora-ref
    python tests/data/make_opensora2_golden.py /tmp/opensora-ref --manifest   # benchmarks/manifests/opensora2.json

The upstream code is imported from the folder given as the argument; nothing of it is copied here. Its
optional GPU dependencies are replaced by plain torch with the same forward math (the stubs below):
- flash_attn.flash_attn_func (B, L, H, D) -> torch scaled_dot_product_attention;
- liger_kernel's LigerRopeFunction -> rotate-half RoPE (q*cos + rotate_half(q)*sin), the math of its kernel;
- liger_kernel's LigerRMSNormFunction -> x * rsqrt(mean(x^2) + eps) * w in fp32 ("llama" casting);
- opensora.acceleration.checkpoint.auto_grad_checkpoint -> a plain call (its no-checkpoint path);
- opensora.registry / opensora.utils.ckpt -> unused placeholders; torch.compile -> identity (CPU, no compiler).

Writes tests/data/opensora2_tiny.safetensors (a tiny random model in the release's key layout:
fused_qkv = False, use_liger_rope = True, cond_embed = True; bf16-valued weights) and
tests/data/opensora2_tiny_golden.safetensors (fp32 inputs, the reference output and the input of every
double block's txt_mlp.0, computed in fp32).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

COMMIT = "7ad6a96a135feb81f755c84fb391818718f6beb2"
CONFIG = dict(
    in_channels=16,  # 4 latent channels x 2x2 patch
    vec_in_dim=12,
    context_in_dim=24,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=3,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,
    cond_embed=True,
    fused_qkv=False,
    use_liger_rope=True,
    patch_size=2,
)
# configs/diffusion/inference/256px.py (768px.py inherits the model): the released 11.9B MMDiT
RELEASE = dict(
    in_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,
    cond_embed=True,
    fused_qkv=False,
    use_liger_rope=True,
)
GRID = (3, 4, 6)  # latent frames, packed rows, packed columns: 72 video tokens
TXT = 16


def _stub(name: str, **attrs) -> None:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def _install_stubs(root: Path) -> None:
    def flash_attn_func(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    class LigerRopeFunction:
        @staticmethod
        def apply(q, k, cos, sin):
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

            def rot(x):
                a, b = x.chunk(2, dim=-1)
                return torch.cat((-b, a), dim=-1)

            return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    class LigerRMSNormFunction:
        @staticmethod
        def apply(x, w, eps, offset, mode, in_place):
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            return y * (offset + w)

    class _Registry:
        def register_module(self, *_a, **_k):
            return lambda f: f

    _stub("flash_attn", flash_attn_func=flash_attn_func)
    _stub("liger_kernel")
    _stub("liger_kernel.ops")
    _stub("liger_kernel.ops.rope", LigerRopeFunction=LigerRopeFunction)
    _stub("liger_kernel.ops.rms_norm", LigerRMSNormFunction=LigerRMSNormFunction)
    _stub("opensora.acceleration.checkpoint", auto_grad_checkpoint=lambda m, *a, **k: m(*a, **k))
    _stub("opensora.registry", MODELS=_Registry())
    _stub("opensora.utils.ckpt", load_checkpoint=None)
    for pkg in ("opensora", "opensora.models", "opensora.acceleration", "opensora.utils"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules.setdefault(pkg, mod)
    torch.compile = lambda model=None, **_k: model if model is not None else (lambda f: f)
    sys.path[:0] = [str(root), str(root / "_site")]


def main(root: Path) -> None:
    _install_stubs(root)
    from opensora.models.mmdit.model import MMDiTConfig, MMDiTModel

    torch.manual_seed(0)
    model = MMDiTModel(MMDiTConfig(from_pretrained="", cache_dir="", **CONFIG)).float().eval()
    g = torch.Generator().manual_seed(1234)
    weights = {}
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith(
                "scale"
            ):  # RMSNorm scales: around 1, distinct per dim (the permutation shows)
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            elif p.dim() == 2:
                v = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            else:
                v = 0.1 * torch.randn(p.shape, generator=g)
            v = v.to(torch.bfloat16)  # the release is bf16: store exactly what is computed with
            p.copy_(v.float())
            weights[k] = v.contiguous()

    T, Hh, Ww = GRID
    B = 2
    ids = torch.zeros(T, Hh, Ww, 3)
    ids[..., 0] += torch.arange(T)[:, None, None]
    ids[..., 1] += torch.arange(Hh)[None, :, None]
    ids[..., 2] += torch.arange(Ww)[None, None, :]
    img_ids = ids.reshape(1, -1, 3).repeat(B, 1, 1)
    n = img_ids.shape[1]
    inp = {
        "img": torch.randn(B, n, CONFIG["in_channels"], generator=g),
        "img_ids": img_ids,
        "txt": torch.randn(B, TXT, CONFIG["context_in_dim"], generator=g),
        "txt_ids": torch.zeros(B, TXT, 3),
        "timesteps": torch.tensor([0.83, 0.27]),
        "y_vec": torch.randn(B, CONFIG["vec_in_dim"], generator=g),
        # sample 0: an I2V-style condition (mask + reference channels); sample 1: zeros, as for T2V
        "cond": torch.cat(
            [
                torch.randn(1, n, CONFIG["in_channels"] + CONFIG["patch_size"] ** 2, generator=g),
                torch.zeros(1, n, CONFIG["in_channels"] + CONFIG["patch_size"] ** 2),
            ]
        ),
    }
    seen = {}
    hooks = [
        blk.txt_mlp[0].register_forward_pre_hook(
            lambda _m, a, i=i: seen.__setitem__(f"txt_mlp_in.{i}", a[0].detach().clone())
        )
        for i, blk in enumerate(model.double_blocks)
    ]
    with torch.no_grad():
        out = model(**inp)
    for h in hooks:
        h.remove()
    here = Path(__file__).resolve().parent
    meta = {"format": "pt"}
    save_file(weights, str(here / "opensora2_tiny.safetensors"), metadata=meta)
    golden = {f"input.{k}": v.contiguous() for k, v in inp.items()}
    golden["output"] = out.contiguous()
    golden.update({k: v.contiguous() for k, v in seen.items()})
    info = {"upstream": f"hpcaitech/Open-Sora@{COMMIT}", "config": CONFIG, "grid": list(GRID)}
    save_file(
        golden,
        str(here / "opensora2_tiny_golden.safetensors"),
        metadata={"format": "pt", "vpatch.golden": json.dumps(info)},
    )
    print("params", sum(v.numel() for v in weights.values()), "output", tuple(out.shape))


def manifest(root: Path) -> None:
    """Key names and shapes of the released model, built on the meta device (no weights)."""
    _install_stubs(root)
    from opensora.models.mmdit.model import MMDiTConfig, MMDiTModel

    with torch.device("meta"):
        model = MMDiTModel(MMDiTConfig(from_pretrained="", cache_dir="", **RELEASE))
    tensors = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    doc = {
        "class": None,
        "layout": "single file (Open_Sora_v2.safetensors), the release's key names",
        "source": f"hpcaitech/Open-Sora@{COMMIT} opensora/models/mmdit, configs/diffusion/inference/256px.py",
        "config": RELEASE,
        "params": sum(int(torch.Size(s).numel()) for _k, s in tensors),
        "tensors": tensors,
    }
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "manifests" / "opensora2.json"
    out.write_text(json.dumps(doc, separators=(",", ":")))
    print(out, doc["params"] / 1e9, "B params,", len(tensors), "tensors")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--manifest"]):
        raise SystemExit(__doc__)
    (manifest if sys.argv[2:] else main)(Path(sys.argv[1]).resolve())
