"""Open-Sora 2.0 through diffusers' FluxTransformer2DModel, checked against the upstream MMDiT.

tests/data/opensora2_tiny*.safetensors hold a tiny random model in the release's key layout, inputs,
and what hpcaitech/Open-Sora's own MMDiT (commit in the file's metadata) computed from them in fp32:
its output and the input of every double block's txt_mlp.0 (tests/data/make_opensora2_golden.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from patcher.errors import ProbeError  # noqa: E402
from patcher.families.conversion import build_module, convert_tensors, one_to_one  # noqa: E402
from patcher.families.recipes import load_family  # noqa: E402
from patcher.probe import mmdit_video  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "opensora2_tiny.safetensors"
GOLDEN = DATA / "opensora2_tiny_golden.safetensors"
TINY = ["convert.config.axes_dims_rope=[4, 6, 6]"]  # the tiny model's head_dim is 16


def _golden():
    with safe_open(str(GOLDEN), "pt") as f:
        info = json.loads(f.metadata()["vpatch.golden"])
    return load_file(str(GOLDEN)), info


def _module(weights: dict[str, torch.Tensor], overrides=()):
    fam = load_family("opensora2", [*TINY, *overrides])
    return build_module(fam.convert, list(weights), lambda k: weights[k]), fam


def _run(model, g):
    return mmdit_video.forward(
        model,
        g["input.img"],
        g["input.txt"],
        g["input.y_vec"],
        g["input.timesteps"],
        g["input.img_ids"][0],
        g["input.cond"],
    )


def test_golden_file_is_the_upstream_release_layout():
    g, info = _golden()
    assert info["upstream"].startswith("hpcaitech/Open-Sora@7ad6a96")
    w = load_file(str(WEIGHTS))
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    assert "double_blocks.0.txt_attn.q_proj.weight" in w and "cond_in.weight" in w
    assert "single_blocks.1.v_mlp.weight" in w and "double_blocks.2.txt_mlp.0.weight" in w
    assert g["output"].shape == (2, 72, 16) and g["input.cond"][0].abs().sum() > 0


def test_converted_flux_module_reproduces_the_upstream_output():
    g, _ = _golden()
    model, _ = _module(load_file(str(WEIGHTS)))
    assert type(model).__name__ == "FluxTransformer2DModel"
    with torch.no_grad():
        out = _run(model, g)
    err = float((out - g["output"]).abs().max())
    print(
        f"opensora2 tiny, fp32: output max abs error {err:.3g} (scale {float(g['output'].abs().max()):.3g})"
    )
    assert err <= 1e-5


def test_probe_hook_sees_upstream_txt_mlp_inputs():
    """The module the probe hooks for double_blocks.N.txt_mlp.0, found through the conversion, gets
    exactly what upstream's txt_mlp[0] got."""
    g, _ = _golden()
    w = load_file(str(WEIGHTS))
    model, fam = _module(w)
    from patcher.probe.sites import Hooks, find_module

    mods = {}
    for n in range(3):
        tgt = one_to_one(fam.convert, f"double_blocks.{n}.txt_mlp.0.weight", w)
        assert tgt == f"transformer_blocks.{n}.ff_context.net.0.proj.weight"
        mods[n] = find_module(model, tgt.removesuffix(".weight"))
    hooks = Hooks(mods, lambda _n, x: x)
    with torch.no_grad():
        _run(model, g)
    got = hooks.take()
    hooks.remove()
    for n in range(3):
        err = float((got[n][0] - g[f"txt_mlp_in.{n}"]).abs().max())
        print(f"txt_mlp.0 input, block {n}: max abs error {err:.3g}")
        assert got[n][0].shape == g[f"txt_mlp_in.{n}"].shape == (2, 16, 32)
        assert err <= 1e-5


def test_fused_qkv_checkpoint_converts_to_the_same_module():
    """fused_qkv = True checkpoints (txt/img_attn.qkv, single_blocks.linear1) give the same weights."""
    w = load_file(str(WEIGHTS))
    fused = {}
    for k, v in w.items():
        if any(f"_attn.{p}_proj." in k for p in "kv") or any(
            f".{p}_proj." in k and k.startswith("single_") for p in "k"
        ):
            continue
        if "_attn.q_proj." in k:
            a = k.replace("q_proj", "qkv")
            fused[a] = torch.cat([v, w[k.replace("q_", "k_")], w[k.replace("q_", "v_")]])
        elif k.startswith("single_") and ".q_proj." in k:
            fused[k.replace("q_proj", "linear1")] = torch.cat(
                [v, w[k.replace("q_proj", "k_proj")], w[k.replace("q_proj", "v_mlp")]]
            )
        elif ".v_mlp." in k:
            continue
        else:
            fused[k] = v
    assert any(".linear1." in k for k in fused) and any("_attn.qkv." in k for k in fused)
    a, _ = convert_tensors(load_family("opensora2", TINY).convert, list(w), lambda k: w[k])
    b, _ = convert_tensors(load_family("opensora2", TINY).convert, list(fused), lambda k: fused[k])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_transform_is_needed():
    """Negative controls: without the RoPE row permutation, the chunk swap, or with Flux-style
    (0, h, w) ids, the output is far from upstream's; the tolerance above can fail."""
    g, _ = _golden()
    w = load_file(str(WEIGHTS))
    fam = load_family("opensora2", TINY)
    for drop in ("interleave_halves", "swap_halves"):
        conv = fam.convert.__class__(
            fam.convert.module,
            fam.convert.why,
            fam.convert.config,
            fam.convert.keys,
            tuple(r for r in fam.convert.tensors if r.op != drop),
        )
        model = build_module(conv, list(w), lambda k: w[k])
        with torch.no_grad():
            err = float((_run(model, g) - g["output"]).abs().max())
        assert err > 1e-2, drop
    model, _ = _module(w)
    ids = g["input.img_ids"][0].clone()
    ids[:, 0] = 0
    with torch.no_grad():
        out = mmdit_video.forward(
            model,
            g["input.img"],
            g["input.txt"],
            g["input.y_vec"],
            g["input.timesteps"],
            ids,
            g["input.cond"],
        )
    assert float((out - g["output"]).abs().max()) > 1e-2


def test_txt_mlp_maps_one_to_one_and_transformed_weights_do_not():
    w = load_file(str(WEIGHTS))
    conv = load_family("opensora2", TINY).convert
    assert one_to_one(conv, "double_blocks.1.txt_mlp.0.weight", w) == (
        "transformer_blocks.1.ff_context.net.0.proj.weight"
    )
    for k in (
        "double_blocks.1.txt_attn.q_proj.weight",  # permuted
        "img_in.weight",  # cond_in folds into it
        "single_blocks.0.v_mlp.weight",  # split
        "final_layer.adaLN_modulation.1.weight",  # halves swapped
    ):
        assert one_to_one(conv, k, w) is None, k


def test_unclaimed_key_fails(tmp_path):
    w = load_file(str(WEIGHTS))
    w["guidance_in.in_layer.weight"] = torch.zeros(32, 256)
    with pytest.raises(ProbeError, match="no rule for guidance_in"):
        _module(w)


def test_schedule_and_positions_follow_upstream():
    """Open-Sora's get_schedule for 256px 16:9 (12 x 21 tokens per frame), 129 frames (33 latent);
    values computed by hand from its formula."""
    g = mmdit_video.grid({"num_frames": 129, "height": 192, "width": 336})
    assert (g.frames, g.rows, g.cols) == (33, 12, 21)
    alpha = (1 + 2 * (252 - 256) / 3840) * 33**0.5
    ts = mmdit_video.schedule(2, g)
    assert ts[0] == pytest.approx(1.0) and ts[2] == pytest.approx(0.0)
    assert ts[1] == pytest.approx(alpha * 0.5 / (1 + (alpha - 1) * 0.5), rel=1e-6)
    ids = mmdit_video.positions(mmdit_video.Grid(2, 3, 4, 16, 2))
    assert ids.shape == (24, 3)
    assert ids[13].tolist() == [1.0, 0.0, 1.0]  # t-major: token 13 = frame 1, row 0, column 1


def test_noise_is_packed_like_upstream():
    g = mmdit_video.Grid(2, 3, 4, 4, 2)
    x = mmdit_video.noise(g, seed=5)
    z = torch.randn(1, 4, 2, 6, 8, generator=torch.Generator().manual_seed(5))
    # upstream: rearrange "b c t (h ph) (w pw) -> b (t h w) (c ph pw)"; token (t=1, h=2, w=3)
    tok = x[0, 1 * 12 + 2 * 4 + 3]
    assert torch.equal(tok, z[0, :, 1, 4:6, 6:8].reshape(-1))


def test_edit_is_written_under_the_original_key_and_reaches_the_module(tmp_path):
    """An edit of double_blocks.N.txt_mlp.0.weight in the single file is the same edit of the converted
    module's ff_context.net.0.proj: reconverting the patched file gives exactly W - λ(Wu)uᵀ there."""
    from patcher.erasure.refusal import edit_weight

    w = load_file(str(WEIGHTS))
    u = torch.randn(32)
    u = u / u.norm()
    key = "double_blocks.2.txt_mlp.0.weight"
    w2 = dict(w)
    w2[key] = edit_weight(w[key].float(), u[:, None], 1.0).to(torch.bfloat16)
    save_file(w2, str(tmp_path / "patched.safetensors"))
    model, _ = _module(load_file(str(tmp_path / "patched.safetensors")))
    got = model.transformer_blocks[2].ff_context.net[0].proj.weight
    assert torch.equal(got, w2[key].float())
    got = got.detach()
    assert float((got @ u).norm()) < 1e-2 * float((w[key].float() @ u).norm()) + 1e-2


def test_release_shapes_convert_into_flux_with_the_release_config():
    """The 11.9B release's keys and shapes (benchmarks/manifests/opensora2.json, from the upstream model
    on the meta device) convert with the recipe as shipped and load strictly into FluxTransformer2DModel."""
    doc = json.loads(
        (DATA.parent.parent / "benchmarks" / "manifests" / "opensora2.json").read_text()
    )
    shapes = {k: s for k, s in doc["tensors"]}
    fam = load_family("opensora2")
    model = build_module(
        fam.convert,
        list(shapes),
        lambda k: torch.empty(shapes[k], device="meta", dtype=torch.bfloat16),
        torch.bfloat16,
        "meta",
    )
    cfg = model.config
    assert (cfg.num_layers, cfg.num_single_layers) == (19, 38)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (24, 128)
    assert (cfg.in_channels, cfg.out_channels) == (132, 64)
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim) == (4096, 768)
    n = sum(p.numel() for p in model.state_dict().values())
    assert doc["params"] == 11_891_390_528
    assert n == doc["params"] - 3072  # cond_in.bias is summed into x_embedder.bias


def test_prefixed_single_file_loads_through_the_probe_path(tmp_path):
    """What the probe loads (load_transformer: the family's wrapper prefixes stripped, tensors read
    lazily from the file) reproduces upstream too."""
    from patcher.checkpoint import load_single

    g, _ = _golden()
    w = load_file(str(WEIGHTS))
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in w.items()}, str(path))
    fam = load_family("opensora2", TINY)
    model, stored = mmdit_video.load_transformer(fam, load_single(path), torch.float32, "cpu")
    assert stored["txt_in.weight"] == "model.diffusion_model.txt_in.weight"
    with torch.no_grad():
        assert float((_run(model, g) - g["output"]).abs().max()) <= 1e-5
