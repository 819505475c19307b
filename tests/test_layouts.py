"""Applying a diffusers-keyed delta to the layouts users hold: prefixed single files, original research
layouts (renamed keys), fused QKV/KV tensors. Each original file is built here by hand (renames and
torch.cat written out, not taken from the recipes), patched, split back by hand and compared with the
patched diffusers file."""

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import patcher
from patcher.cli import main
from patcher.erasure.refusal import orthonormalize
from patcher.errors import CompatibilityError, RecipeError
from patcher.families.recipes import parse_family
from patcher.vud.delta import Delta, projection_entry, write_delta

from .conftest import raw_sha

D, T, DT, M = (
    12,
    20,
    10,
    36,
)  # model width, text width, Mochi's text-stream width, Hunyuan's MLP rows


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def qkv(prefix, rows, cols, seed, names=("to_q", "to_k", "to_v"), suffix=".weight"):
    return {f"{prefix}.{n}{suffix}": rnd(rows, cols, seed=seed + i) for i, n in enumerate(names)}


def cat(t, *keys):
    return torch.cat([t[k] for k in keys])


# family -> (diffusers tensors, the original layout built by hand, how to split the original back, edited keys)
def wan():
    c = {
        "condition_embedder.text_embedder.linear_1.weight": rnd(D, T, seed=1),
        "condition_embedder.text_embedder.linear_2.weight": rnd(D, D, seed=2),
        "blocks.0.attn2.to_k.weight": rnd(D, D, seed=3),
        "blocks.0.attn2.to_v.weight": rnd(D, D, seed=4),
        "blocks.0.attn2.add_k_proj.weight": rnd(D, D, seed=5),
        "head.modulation": rnd(1, 2, D, seed=6),
    }
    names = {
        "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
        "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
        "blocks.0.attn2.to_k.weight": "blocks.0.cross_attn.k.weight",
        "blocks.0.attn2.to_v.weight": "blocks.0.cross_attn.v.weight",
        "blocks.0.attn2.add_k_proj.weight": "blocks.0.cross_attn.k_img.weight",
        "head.modulation": "head.modulation",
    }
    o = {names[k]: v for k, v in c.items()}
    back = lambda o: {k: o[n] for k, n in names.items()}  # noqa: E731
    return (
        c,
        o,
        back,
        [
            "condition_embedder.text_embedder.linear_1.weight",
            "blocks.0.attn2.to_k.weight",
            "blocks.0.attn2.to_v.weight",
            "blocks.0.attn2.add_k_proj.weight",
        ],
    )


def cogvideox():
    c = {
        "patch_embed.text_proj.weight": rnd(D, T, seed=1),
        **qkv("transformer_blocks.0.attn1", D, D, 10),
        "norm_final.weight": rnd(D, seed=3),
    }
    p = "transformer_blocks.0.attn1"
    o = {
        "mixins.patch_embed.text_proj.weight": c["patch_embed.text_proj.weight"],
        "transformer.layers.0.attention.query_key_value.weight": cat(
            c, f"{p}.to_q.weight", f"{p}.to_k.weight", f"{p}.to_v.weight"
        ),
        "norm_final.weight": c["norm_final.weight"],
    }

    def back(o):
        q, k, v = o["transformer.layers.0.attention.query_key_value.weight"].chunk(3)
        return {
            "patch_embed.text_proj.weight": o["mixins.patch_embed.text_proj.weight"],
            f"{p}.to_q.weight": q,
            f"{p}.to_k.weight": k,
            f"{p}.to_v.weight": v,
            "norm_final.weight": o["norm_final.weight"],
        }

    return c, o, back, ["patch_embed.text_proj.weight", f"{p}.to_k.weight", f"{p}.to_v.weight"]


def hunyuan():
    d, s = "transformer_blocks.0.attn", "single_transformer_blocks.0"
    c = {
        "context_embedder.proj_in.weight": rnd(D, T, seed=1),
        **qkv(d, D, D, 10, ("add_q_proj", "add_k_proj", "add_v_proj")),
        **qkv(f"{s}.attn", D, D, 20),
        f"{s}.proj_mlp.weight": rnd(M, D, seed=30),
    }
    o = {
        "txt_in.input_embedder.weight": c["context_embedder.proj_in.weight"],
        "double_blocks.0.txt_attn_qkv.weight": cat(
            c, f"{d}.add_q_proj.weight", f"{d}.add_k_proj.weight", f"{d}.add_v_proj.weight"
        ),
        "single_blocks.0.linear1.weight": cat(
            c,
            f"{s}.attn.to_q.weight",
            f"{s}.attn.to_k.weight",
            f"{s}.attn.to_v.weight",
            f"{s}.proj_mlp.weight",
        ),
    }

    def back(o):
        q, k, v = o["double_blocks.0.txt_attn_qkv.weight"].chunk(3)
        sq, sk, sv, mlp = torch.split(o["single_blocks.0.linear1.weight"], [D, D, D, M])
        return {
            "context_embedder.proj_in.weight": o["txt_in.input_embedder.weight"],
            f"{d}.add_q_proj.weight": q,
            f"{d}.add_k_proj.weight": k,
            f"{d}.add_v_proj.weight": v,
            f"{s}.attn.to_q.weight": sq,
            f"{s}.attn.to_k.weight": sk,
            f"{s}.attn.to_v.weight": sv,
            f"{s}.proj_mlp.weight": mlp,
        }

    return (
        c,
        o,
        back,
        [
            "context_embedder.proj_in.weight",
            f"{d}.add_k_proj.weight",
            f"{d}.add_v_proj.weight",
            f"{s}.attn.to_k.weight",
        ],
    )


def mochi():
    p = "transformer_blocks.0.attn1"
    c = {
        "time_embed.caption_proj.weight": rnd(DT, T, seed=1),
        **qkv(p, D, DT, 10, ("add_q_proj", "add_k_proj", "add_v_proj")),
    }
    o = {
        "t5_yproj.weight": c["time_embed.caption_proj.weight"],
        "blocks.0.attn.qkv_y.weight": cat(
            c, f"{p}.add_q_proj.weight", f"{p}.add_k_proj.weight", f"{p}.add_v_proj.weight"
        ),
    }

    def back(o):
        q, k, v = o["blocks.0.attn.qkv_y.weight"].chunk(3)
        return {
            "time_embed.caption_proj.weight": o["t5_yproj.weight"],
            f"{p}.add_q_proj.weight": q,
            f"{p}.add_k_proj.weight": k,
            f"{p}.add_v_proj.weight": v,
        }

    return (
        c,
        o,
        back,
        ["time_embed.caption_proj.weight", f"{p}.add_k_proj.weight", f"{p}.add_v_proj.weight"],
    )


def ltx():
    c = {
        "caption_projection.linear_1.weight": rnd(D, T, seed=1),
        "transformer_blocks.0.attn2.to_k.weight": rnd(D, D, seed=2),
        "patchify_proj.weight": rnd(D, 4, seed=3),
    }
    return (
        c,
        dict(c),
        lambda o: dict(o),
        ["caption_projection.linear_1.weight", "transformer_blocks.0.attn2.to_k.weight"],
    )


def opensora2():
    p = "double_blocks.0.txt_attn"
    c = {"txt_in.weight": rnd(D, T, seed=1), **qkv(p, D, D, 10, ("q_proj", "k_proj", "v_proj"))}
    o = {
        "txt_in.weight": c["txt_in.weight"],
        f"{p}.qkv.weight": cat(c, f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight"),
    }

    def back(o):
        q, k, v = o[f"{p}.qkv.weight"].chunk(3)
        return {
            "txt_in.weight": o["txt_in.weight"],
            f"{p}.q_proj.weight": q,
            f"{p}.k_proj.weight": k,
            f"{p}.v_proj.weight": v,
        }

    return c, o, back, ["txt_in.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight"]


CASES = {
    "wan": wan,
    "cogvideox": cogvideox,
    "hunyuan": hunyuan,
    "mochi": mochi,
    "ltx": ltx,
    "opensora2": opensora2,
}


def delta_for(path, tensors, keys, family, strength=1.0):
    entries = []
    for i, k in enumerate(keys):
        W = tensors[k]
        B = orthonormalize(
            torch.randn(W.shape[1], 1, generator=torch.Generator().manual_seed(100 + i))
        )
        entries.append(
            projection_entry(f"transformer/{k}", W.float(), B, strength, raw_sha(W), "BF16")
        )
    write_delta(path, Delta(entries, {"name": "red"}, {"name": "cpca", "family": family}))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
@pytest.mark.parametrize("family", sorted(CASES))
def test_original_and_fused_layouts_patch_like_diffusers(tmp_path, family, prefix):
    c, o, back, keys = CASES[family]()
    c = {k: v.to(torch.bfloat16) for k, v in c.items()}
    o = {prefix + k: v.to(torch.bfloat16) for k, v in o.items()}
    save_file(c, tmp_path / "diffusers.safetensors")
    save_file(o, tmp_path / "original.safetensors")
    delta_for(tmp_path / "d.vud", c, keys, family)

    rc = patcher.apply_delta(
        tmp_path / "diffusers.safetensors", tmp_path / "d.vud", tmp_path / "c.safetensors"
    )
    ro = patcher.apply_delta(
        tmp_path / "original.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
    )
    assert rc.coverage["matched"] == ro.coverage["matched"] == len(keys)
    out_c = load_file(tmp_path / "c.safetensors")
    out_o = back(
        {k.removeprefix(prefix): v for k, v in load_file(tmp_path / "o.safetensors").items()}
    )
    assert out_c.keys() == out_o.keys()
    for k in out_c:
        assert torch.equal(out_c[k], out_o[k]), k  # same math on the same rows: bit-identical
        assert torch.equal(out_c[k], c[k]) == (k not in keys), (
            k
        )  # edited rows changed, the rest (q, mlp) untouched
    # each original block is the exact tensor the delta was probed from
    assert all(p["fingerprint"] == "base" for p in ro.planned)
    fused = [p for p in ro.planned if any("[" in s for s in p["stored"])]
    assert bool(fused) == (family in ("cogvideox", "hunyuan", "mochi", "opensora2"))


def test_inspect_delta_shows_how_each_entry_resolves(tmp_path):
    c, o, _back, keys = hunyuan()
    save_file(
        {"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in o.items()},
        tmp_path / "hy.safetensors",
    )
    delta_for(tmp_path / "d.vud", {k: v.to(torch.bfloat16) for k, v in c.items()}, keys, "hunyuan")
    res = CliRunner().invoke(
        main,
        ["inspect", str(tmp_path / "hy.safetensors"), "--delta", str(tmp_path / "d.vud"), "--json"],
    )
    assert res.exit_code == 0, res.output
    rows = {r["key"]: r for r in json.loads(res.stdout)["entries"]}
    k = rows["transformer/single_transformer_blocks.0.attn.to_k.weight"]
    assert k["stored"] == [f"model.diffusion_model.single_blocks.0.linear1.weight[{D}:{2 * D}]"]
    assert "original layout" in k["how"] and "prefix 'model.diffusion_model.'" in k["how"]
    assert rows["transformer/context_embedder.proj_in.weight"]["stored"] == [
        "model.diffusion_model.txt_in.input_embedder.weight"
    ]
    res = CliRunner(env={"COLUMNS": "400"}).invoke(
        main, ["inspect", str(tmp_path / "hy.safetensors"), "--delta", str(tmp_path / "d.vud")]
    )
    assert res.exit_code == 0 and "linear1.weight[12:24]" in res.output


def test_a_fused_tensor_whose_rows_do_not_add_up_is_a_shape_mismatch(tmp_path):
    c, o, _back, keys = mochi()
    o["blocks.0.attn.qkv_y.weight"] = o["blocks.0.attn.qkv_y.weight"][
        :-1
    ]  # 35 rows cannot be [q | k | v] of 12
    save_file({k: v.to(torch.bfloat16) for k, v in o.items()}, tmp_path / "bad.safetensors")
    delta_for(tmp_path / "d.vud", {k: v.to(torch.bfloat16) for k, v in c.items()}, keys, "mochi")
    with pytest.raises(CompatibilityError, match="wrong shape"):
        patcher.apply_delta(
            tmp_path / "bad.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )
    res = CliRunner().invoke(
        main,
        [
            "inspect",
            str(tmp_path / "bad.safetensors"),
            "--delta",
            str(tmp_path / "d.vud"),
            "--json",
        ],
    )
    rows = {r["key"]: r for r in json.loads(res.stdout)["entries"]}
    assert rows["transformer/transformer_blocks.0.attn1.add_k_proj.weight"]["status"] == "shape"
    assert "35 rows" in rows["transformer/transformer_blocks.0.attn1.add_k_proj.weight"]["note"]
    assert rows["transformer/time_embed.caption_proj.weight"]["status"] == "matched"


def test_revert_restores_a_fused_tensor_exactly(tmp_path):
    c, o, _back, keys = cogvideox()
    save_file({k: v.to(torch.bfloat16) for k, v in o.items()}, tmp_path / "sat.safetensors")
    delta_for(
        tmp_path / "d.vud",
        {k: v.to(torch.bfloat16) for k, v in c.items()},
        keys,
        "cogvideox",
        strength=0.7,
    )
    patcher.apply_delta(
        tmp_path / "sat.safetensors",
        tmp_path / "d.vud",
        tmp_path / "p.safetensors",
        revert_record=tmp_path / "r.vpr",
    )
    r = patcher.revert_delta(
        tmp_path / "p.safetensors",
        tmp_path / "d.vud",
        tmp_path / "back.safetensors",
        record=tmp_path / "r.vpr",
    )
    assert all(s.exact for s in r.tensors) and len(r.tensors) == 3
    assert (tmp_path / "back.safetensors").read_bytes() != b"" and load_file(
        tmp_path / "back.safetensors"
    ).keys() == o.keys()
    for k, v in load_file(tmp_path / "back.safetensors").items():
        assert torch.equal(v, o[k].to(torch.bfloat16)), k


def test_clip_keys_resolve_across_transformers_4_and_5_layouts(tmp_path):
    W = rnd(D, T, seed=4).to(torch.bfloat16)
    save_file({"encoder.layers.0.mlp.fc2.weight": W}, tmp_path / "clip5.safetensors")
    B = orthonormalize(torch.randn(T, 1, generator=torch.Generator().manual_seed(0)))
    e = projection_entry(
        "text_encoder/text_model.encoder.layers.0.mlp.fc2.weight",
        W.float(),
        B,
        1.0,
        raw_sha(W),
        "BF16",
    )
    write_delta(
        tmp_path / "d.vud", Delta([e], {"name": "red"}, {"name": "cpca", "family": "zeroscope"})
    )
    r = patcher.apply_delta(
        tmp_path / "clip5.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
    )
    assert (
        r.planned[0]["stored"] == ["encoder.layers.0.mlp.fc2.weight"]
        and r.planned[0]["fingerprint"] == "base"
    )
    assert not torch.equal(
        load_file(tmp_path / "o.safetensors")["encoder.layers.0.mlp.fc2.weight"], W
    )


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"layout": "x", "diffusers": "a(", "stored": "b"}, "not a valid regular expression"),
        ({"layout": "x", "diffusers": r"a\.(\d+)", "stored": "b.{2}"}, "may only use"),
        (
            {"layout": "x", "diffusers": "a", "stored": "b", "split": ["out", "out"]},
            "both 'split' and 'part'",
        ),
        (
            {
                "layout": "x",
                "diffusers": "a",
                "stored": "b",
                "split": ["out", "rest", "rest"],
                "part": 0,
            },
            "\"rest\" once",
        ),
        (
            {"layout": "x", "diffusers": "a", "stored": "b", "split": ["out", 0], "part": 0},
            "row counts",
        ),
        (
            {"layout": "x", "diffusers": "a", "stored": "b", "split": ["out"], "part": 1},
            "indexes 'split'",
        ),
        ({"layout": "x", "diffusers": "a", "stored": "b", "spilt": ["out"]}, "unknown field"),
    ],
)
def test_bad_alias_rules_name_the_field(bad, msg):
    data = {
        "name": "f",
        "detect": {"keys": ["a"]},
        "encoders": {"text": {"kind": "text", "component": "text_encoder"}},
        "sites": {
            "s": {
                "why": "w",
                "mode": "text",
                "encoder": "text",
                "components": ["transformer"],
                "weights": ["a"],
            }
        },
        "defaults": {"sites": ["s"]},
        "aliases": {"keys": [bad]},
    }
    with pytest.raises(RecipeError, match=msg) as ei:
        parse_family(data, "f.toml")
    assert "f.toml.aliases.keys[0]" in str(ei.value)


# diffusers' own single-file converters (loaders/single_file_utils.py) as an independent oracle for the
# recipe data: build the original tensors where our rules say they are, convert them with diffusers,
# and the diffusers key must get exactly those rows back.
ORACLE = {
    "wan": (
        "convert_wan_transformer_to_diffusers",
        {
            "condition_embedder.text_embedder.linear_1.weight": (8, 6),
            "condition_embedder.text_embedder.linear_2.weight": (8, 8),
            "blocks.0.attn2.to_q.weight": (8, 8),
            "blocks.0.attn2.to_k.weight": (8, 8),
            "blocks.1.attn2.to_v.weight": (8, 8),
            "blocks.0.attn2.add_k_proj.weight": (8, 8),
            "blocks.3.attn2.add_v_proj.weight": (8, 8),
            "condition_embedder.image_embedder.ff.net.0.proj.weight": (5, 5),
            "condition_embedder.image_embedder.ff.net.2.weight": (8, 5),
        },
        {},
    ),
    # the converter hard-codes HunyuanVideo's width (3072 rows per block); 2 columns keep it small
    "hunyuan": (
        "convert_hunyuan_video_transformer_to_diffusers",
        {
            "context_embedder.proj_in.weight": (3072, 2),
            "context_embedder.time_text_embed.text_embedder.linear_1.weight": (3072, 2),
            "context_embedder.time_text_embed.text_embedder.linear_2.weight": (3072, 3),
            "time_text_embed.text_embedder.linear_1.weight": (3072, 2),
            "time_text_embed.text_embedder.linear_2.weight": (3072, 3),
            "transformer_blocks.0.attn.add_q_proj.weight": (3072, 2),
            "transformer_blocks.0.attn.add_k_proj.weight": (3072, 2),
            "transformer_blocks.0.attn.add_v_proj.weight": (3072, 2),
            "single_transformer_blocks.1.attn.to_q.weight": (3072, 2),
            "single_transformer_blocks.1.attn.to_k.weight": (3072, 2),
            "single_transformer_blocks.1.attn.to_v.weight": (3072, 2),
        },
        {"single_blocks.1.linear1.weight": 3 * 3072 + 40},
    ),
}


# HunyuanVideo-I2V is the same transformer class and original layout; its recipe repeats the rules
ORACLE["hunyuan_i2v"] = ORACLE["hunyuan"]


@pytest.mark.parametrize("family", sorted(ORACLE))
def test_alias_rules_agree_with_diffusers_single_file_converters(family):
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from patcher.layouts import rules_for

    fn, wanted, fused_rows = ORACLE[family]
    rules = rules_for(family)
    original: dict[str, torch.Tensor] = {}
    expect: dict[str, torch.Tensor] = {}
    for i, (key, (out, inn)) in enumerate(sorted(wanted.items())):
        renamed = [
            (stored, r)
            for stored, r, how in rules.candidates(key)
            if r is not None and "prefix" not in how
        ]
        assert renamed, f"{family}: no rule renames {key}"
        stored, rule = renamed[0]
        block = rnd(out, inn, seed=200 + i)
        expect[key] = block
        if rule.split is None:
            original[stored] = block
            continue
        total = fused_rows.get(stored, out * len(rule.split))
        a, b = rule.rows(out, total)
        original.setdefault(stored, torch.full((total, inn), float("nan")))[a:b] = block
    converted = getattr(sfu, fn)(dict(original))
    for key, block in expect.items():
        assert key in converted, f"diffusers maps none of our stored keys to {key}"
        assert torch.equal(converted[key], block), key


# The original LDM UNet layout (SD1.5 under AnimateDiff, ModelScope/ZeroScope): the recipes' per-block
# renames, checked against diffusers' own LDM -> diffusers UNet conversion on a tiny SD-shaped UNet.
def _sd_shaped_unet(family):
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    torch.manual_seed(0)
    kw = dict(
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=2,
        cross_attention_dim=6,
        norm_num_groups=2,
    )
    if family == "zeroscope":
        return UNet3DConditionModel(
            down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
            attention_head_dim=2,
            **kw,
        )
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=2,
        sample_size=8,
        **kw,
    )


def _ldm_names_by_diffusers(sd_keys, config) -> dict[str, str]:
    """diffusers key -> LDM key for every spatial-attention parameter, found by running diffusers'
    convert_ldm_unet_checkpoint on every candidate LDM name (each a distinct value) and reading back
    where each value landed: the conversion inverted by the conversion itself."""
    import re

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    rests = set()
    for k in sd_keys:
        m = re.fullmatch(r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.(.*)", k)
        if m:
            rests.add(m.group(1))
    cands = [
        f"{b}.{i}.1.{r}"
        for b in ("input_blocks", "output_blocks")
        for i in range(12)
        for r in rests
    ]
    cands += [f"middle_block.{i}.{r}" for i in range(3) for r in rests]
    ckpt = {f"model.diffusion_model.{c}": torch.tensor([float(j)]) for j, c in enumerate(cands)}
    out = convert_ldm_unet_checkpoint(ckpt, dict(config))
    return {k: cands[int(v.item())] for k, v in out.items() if k in sd_keys}


@pytest.mark.parametrize("family", ["animatediff", "zeroscope"])
def test_ldm_unet_aliases_agree_with_diffusers_ldm_conversion(tmp_path, family):
    pytest.importorskip("diffusers.loaders.single_file_utils")
    from patcher.layouts import rules_for

    unet = _sd_shaped_unet(family)
    sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ldm = _ldm_names_by_diffusers(set(sd), unet.config)
    kv = sorted(
        k
        for k in sd
        if re.fullmatch(r".*\.attentions\.\d+\.transformer_blocks\.\d+\.attn2\.to_[kv]\.weight", k)
    )
    assert len(kv) == 2 * 16 and set(kv) <= set(
        ldm
    )  # 6 down, 1 mid, 9 up cross-attentions, K and V
    rules = rules_for(family)
    for k in kv:
        renamed = [s for s, r, how in rules.candidates(k) if r is not None and "prefix" not in how]
        assert renamed[:1] == [ldm[k]], (k, renamed, ldm[k])
    # the same delta applied to the diffusers file and to the LDM single file edits the same weights
    save_file({k: sd[k] for k in kv}, tmp_path / "diffusers.safetensors")
    original = {f"model.diffusion_model.{ldm[k]}": v for k, v in sd.items() if k in ldm}
    original["model.diffusion_model.time_embed.0.weight"] = sd["time_embedding.linear_1.weight"]
    save_file(original, tmp_path / "ldm.safetensors")
    entries = []
    for i, k in enumerate(kv):
        B = orthonormalize(
            torch.randn(sd[k].shape[1], 1, generator=torch.Generator().manual_seed(i))
        )
        entries.append(projection_entry(f"unet/{k}", sd[k].float(), B, 1.0, raw_sha(sd[k]), "F32"))
    write_delta(
        tmp_path / "d.vud", Delta(entries, {"name": "red"}, {"name": "cpca", "family": family})
    )
    rc = patcher.apply_delta(
        tmp_path / "diffusers.safetensors", tmp_path / "d.vud", tmp_path / "c.safetensors"
    )
    ro = patcher.apply_delta(
        tmp_path / "ldm.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
    )
    assert rc.coverage["matched"] == ro.coverage["matched"] == len(kv)
    out_c, out_o = load_file(tmp_path / "c.safetensors"), load_file(tmp_path / "o.safetensors")
    for k in kv:
        assert torch.equal(out_o[f"model.diffusion_model.{ldm[k]}"], out_c[k]) and not torch.equal(
            out_c[k], sd[k]
        )
    for k, v in original.items():  # every other tensor of the single file is untouched
        if not any(k == f"model.diffusion_model.{ldm[x]}" for x in kv):
            assert torch.equal(out_o[k], v), k
