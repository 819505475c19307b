"""`vpatch export --format lora`: for each covered family, a tiny pipeline that loads the exported
file with diffusers' ``load_lora_weights`` and fuses it has the weights of `vpatch apply` and
generates its frames; the ComfyUI file's keys follow ComfyUI's LoRA key map."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from click.testing import CliRunner
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import patcher
from patcher.cli import main
from patcher.erasure.refusal import orthonormalize
from patcher.merge.engine import apply_delta
from patcher.vud.delta import Delta, projection_entry, read_delta, write_delta
from patcher.vud.lora import base_warnings, export_lora, lora_to_delta

from . import tiny_pipes

pytest.importorskip("peft")

# (case, builder, family, transformer keys edited: default site + a K/V site)
CASES = [
    (
        "wan21",
        "wan",
        "wan",
        [
            r"condition_embedder\.text_embedder\.linear_1\.weight",
            r"blocks\.\d+\.attn2\.to_[kv]\.weight",
        ],
    ),
    ("wan22", "wan2", "wan", [r"condition_embedder\.text_embedder\.linear_1\.weight"]),
    (
        "ltx",
        "ltx",
        "ltx",
        [
            r"caption_projection\.linear_1\.weight",
            r"transformer_blocks\.\d+\.attn2\.to_[kv]\.weight",
        ],
    ),
    (
        "hunyuan",
        "hunyuan",
        "hunyuan",
        [
            r"context_embedder\.proj_in\.weight",
            r"context_embedder\.time_text_embed\.text_embedder\.linear_1\.weight",
            r"transformer_blocks\.\d+\.attn\.add_[kv]_proj\.weight",
        ],
    ),
]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-pipes")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            if name == "wan2":
                cache[name] = tiny_pipes.wan(root / name, two_experts=True)
            else:
                cache[name] = tiny_pipes.BUILDERS[name](root / name)
        return cache[name]

    return get


def make_delta(src, family, patterns, path, strength=1.0, m=2, concept="red"):
    """Projection entries computed from the pipeline's own weights, fingerprinted (what a probe writes)."""
    entries = []
    for comp in ("transformer", "transformer_2"):
        f = src / comp / "diffusion_pytorch_model.safetensors"
        if not f.is_file():
            continue
        sd = load_file(f)
        by_in: dict[int, torch.Tensor] = {}
        for k in sorted(sd):
            if any(re.fullmatch(p, k) for p in patterns):
                W = sd[k].float()
                B = by_in.setdefault(
                    W.shape[1],
                    orthonormalize(
                        torch.randn(
                            W.shape[1], m, generator=torch.Generator().manual_seed(W.shape[1])
                        )
                    ),
                )
                sha = hashlib.sha256(sd[k].contiguous().view(torch.uint8).numpy()).hexdigest()
                dt = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[
                    sd[k].dtype
                ]
                entries.append(
                    projection_entry(f"{comp}/{k}", W, B, strength, base_sha256=sha, base_dtype=dt)
                )
    assert entries
    d = Delta(entries, {"name": concept}, {"name": "cpca", "family": family})
    write_delta(path, d)
    return d


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frames(pipe, call, builder):
    kw = dict(call)
    return torch.as_tensor(
        pipe(
            prompt="a red ball moving left",
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).frames
    )


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_diffusers_lora_fused_equals_apply(case, pipes, tmp_path):
    _, builder, family, patterns = case
    src, call = pipes(builder)
    d = make_delta(src, family, patterns, tmp_path / "c.vud", strength=1.0)
    applied = tmp_path / "applied"
    apply_delta(src, tmp_path / "c.vud", applied)
    rep = export_lora(tmp_path / "c.vud", src, tmp_path / "erase.safetensors", target="diffusers")
    comps = sorted({e.component for e in d.entries})
    assert [f.component for f in rep.files] == comps

    pipe = load(src)
    for f in rep.files:
        with safe_open(f.path, "pt") as fh:
            keys = list(fh.keys())
            meta = fh.metadata()
        assert all(k.startswith("transformer.") for k in keys)
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        assert meta["vpatch.format"] == "lora" and meta["vpatch.component"] == f.component
        kw = {"load_into_transformer_2": True} if f.component == "transformer_2" else {}
        pipe.load_lora_weights(f.path, adapter_name=f"erase_{f.component}", **kw)
    pipe.fuse_lora(components=comps, lora_scale=1.0)
    pipe.unload_lora_weights()

    ref = load(applied)
    edited = {e.tensor_key for e in d.entries}
    for comp in comps:
        got = getattr(pipe, comp).state_dict()
        want = getattr(ref, comp).state_dict()
        assert set(got) == set(want)
        for k, w in want.items():
            # fp32 checkpoint: both compute W − λ(Wu)uᵀ in fp32, only the summation order differs
            assert torch.allclose(got[k], w, rtol=0, atol=1e-6 * max(1.0, float(w.abs().max()))), k
        assert any(
            not torch.equal(getattr(load(src), comp).state_dict()[k], want[k]) for k in edited
        )

    orig = frames(load(src), call, builder)
    f_ref = frames(ref, call, builder)
    f_lora = frames(pipe, call, builder)
    gap = float((f_lora - f_ref).abs().max())
    assert gap <= 1e-4
    assert float((orig - f_ref).abs().max()) > 10 * gap  # the edit shows in the frames


def test_bf16_base_matches_within_rounding(pipes, tmp_path):
    """A bf16 checkpoint: diffusers fuses in bf16, apply rounds once from fp32; they agree to a
    bf16 step where they differ at all."""
    src, _ = pipes("wan")
    bf = tmp_path / "wan-bf16"
    pipe = load(src).to(torch.bfloat16)
    pipe.save_pretrained(bf, safe_serialization=True)
    make_delta(bf, "wan", CASES[0][3], tmp_path / "c.vud")
    apply_delta(bf, tmp_path / "c.vud", tmp_path / "applied")
    rep = export_lora(tmp_path / "c.vud", bf, tmp_path / "erase.safetensors")
    p = DiffusionPipeline.from_pretrained(str(bf), torch_dtype=torch.bfloat16)
    p.load_lora_weights(rep.files[0].path)
    p.fuse_lora(components=["transformer"])
    p.unload_lora_weights()
    want = load_file(tmp_path / "applied" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(bf / "transformer" / "diffusion_pytorch_model.safetensors")
    got = p.transformer.state_dict()
    lora = load_file(rep.files[0].path)
    eps = torch.finfo(torch.bfloat16).eps
    changed = 0
    for k, w in want.items():
        b = base[k].float()
        mod = f"transformer.{k[: -len('.weight')]}"
        # PEFT fuses in the weight's dtype: lora_B and lora_A are cast to bf16, B·A is rounded, then
        # the sum; apply rounds W + ΔW once from fp32. Bound: a bf16 step of each factor and sum.
        terms = b.abs()
        if f"{mod}.lora_B.weight" in lora:
            terms = terms + lora[f"{mod}.lora_B.weight"].abs() @ lora[f"{mod}.lora_A.weight"].abs()
        assert bool(((got[k].float() - w.float()).abs() <= 3 * eps * terms).all()), k
        changed += int((w != base[k]).sum())
    assert changed > 0


# ComfyUI's LoRA key map, read from comfyanonymous/ComfyUI at commit
# 41444b5236c613ee5ff7d09aa620f94b702f30eb, comfy/lora.py, model_lora_keys_unet: for every model weight
# "diffusion_model.K.weight" the LoRA module "diffusion_model.K" maps to it ("generic lora format"), and
# load_lora reads "<module>.lora_B.weight" (up) / "<module>.lora_A.weight" (down), scale alpha/rank or 1
# without alpha. The model weights K are ComfyUI's own module names, read from comfy/ldm/wan/model.py
# at 075e17041b2f2b7cdb8f6145800c42ee6a386ffd (text_embedding = Sequential(Linear, GELU, Linear);
# blocks.N.cross_attn.{q,k,v}, k_img/v_img), comfy/ldm/lightricks/model.py at
# c4a6b389de1014471a75a46ee57d2fdac4f8df93 (caption_projection = PixArtAlphaTextProjection with
# linear_1/linear_2; transformer_blocks.N.attn2.to_{q,k,v}) and comfy/ldm/hunyuan_video/model.py at
# c828fdcf0c11dff5cb204f50791e182a53d63d31 (txt_in =
# TokenRefiner: input_embedder, c_embedder = MLPEmbedder with in_layer/out_layer; vector_in =
# MLPEmbedder; double_blocks.N.txt_attn.qkv fused [q | k | v]). Written out here by hand, not derived
# from vpatch's tables.
COMFY_EXPECTED = {
    "wan": {
        "condition_embedder.text_embedder.linear_1.weight": ("text_embedding.0", None),
        "blocks.0.attn2.to_k.weight": ("blocks.0.cross_attn.k", None),
        "blocks.1.attn2.to_v.weight": ("blocks.1.cross_attn.v", None),
    },
    "ltx": {
        "caption_projection.linear_1.weight": ("caption_projection.linear_1", None),
        "transformer_blocks.0.attn2.to_k.weight": ("transformer_blocks.0.attn2.to_k", None),
    },
    "hunyuan": {
        "context_embedder.proj_in.weight": ("txt_in.input_embedder", None),
        "context_embedder.time_text_embed.text_embedder.linear_1.weight": (
            "txt_in.c_embedder.in_layer",
            None,
        ),
        "transformer_blocks.0.attn.add_k_proj.weight": ("double_blocks.0.txt_attn.qkv", 1),
        "transformer_blocks.0.attn.add_v_proj.weight": ("double_blocks.0.txt_attn.qkv", 2),
    },
}


def comfy_model_weights(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The ComfyUI model's weights for the edited modules, built from the diffusers tensors."""
    out = {}
    exp = COMFY_EXPECTED[family]
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for dk, (mod, part) in exp.items():
        if part is None:
            out[f"diffusion_model.{mod}.weight"] = sd[dk].float()
        else:
            fused.setdefault(mod, {})[part] = sd[dk].float()
    for mod, parts in fused.items():
        q = sd[f"transformer_blocks.{mod.split('.')[1]}.attn.add_q_proj.weight"].float()
        out[f"diffusion_model.{mod}.weight"] = torch.cat([q, parts[1], parts[2]])
    return out


def comfy_apply(lora: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's generic key map and its plain LoRA patch, W + (up @ down) · alpha/rank."""
    key_map = {k[: -len(".weight")]: k for k in weights}
    out = {k: w.clone() for k, w in weights.items()}
    loaded = set()
    for module, target in key_map.items():
        up, down = f"{module}.lora_B.weight", f"{module}.lora_A.weight"
        if up in lora:
            alpha = lora.get(f"{module}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            out[target] += scale * (lora[up].float() @ lora[down].float())
            loaded |= {up, down}
    assert loaded == set(lora), f"keys ComfyUI would not load: {sorted(set(lora) - loaded)}"
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "wan22"], ids=lambda c: c[0])
def test_comfyui_keys_follow_comfys_key_map(case, pipes, tmp_path):
    _, builder, family, _ = case
    src, _ = pipes(builder)
    keys = list(COMFY_EXPECTED[family])
    make_delta(src, family, [re.escape(k) for k in keys], tmp_path / "c.vud")
    apply_delta(src, tmp_path / "c.vud", tmp_path / "applied")
    rep = export_lora(tmp_path / "c.vud", src, tmp_path / "erase.safetensors", target="comfyui")
    lora = load_file(rep.files[0].path)
    assert all(k.startswith("diffusion_model.") for k in lora)
    base = load_file(src / "transformer" / "diffusion_pytorch_model.safetensors")
    applied = load_file(
        tmp_path / "applied" / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    got = comfy_apply(lora, comfy_model_weights(base, family))
    want = comfy_model_weights(applied, family)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    # the other rows of a fused module are untouched
    if family == "hunyuan":
        q = base["transformer_blocks.0.attn.add_q_proj.weight"]
        assert torch.equal(
            got["diffusion_model.double_blocks.0.txt_attn.qkv.weight"][: q.shape[0]], q
        )


def test_text_encoder_site_is_refused_by_name(pipes, tmp_path):
    src, _ = pipes("wan")
    sd = load_file(src / "text_encoder" / "model.safetensors")
    k = next(
        k
        for k in sd
        if re.fullmatch(r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wo\.weight", k)
    )
    W = sd[k].float()
    B = orthonormalize(torch.randn(W.shape[1], 1, generator=torch.Generator().manual_seed(0)))
    write_delta(
        tmp_path / "t5.vud",
        Delta(
            [projection_entry(f"text_encoder/{k}", W, B, 1.0)], {"name": "red"}, {"family": "wan"}
        ),
    )
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "t5.vud"),
            "--format",
            "lora",
            "--base",
            str(src),
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert r.exit_code == 2
    assert "site t5_ffn" in r.stderr and "text_encoder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_export_records_base_and_warns_on_another(pipes, tmp_path):
    src, _ = pipes("ltx")
    make_delta(src, "ltx", CASES[2][3], tmp_path / "c.vud")
    out = tmp_path / "erase.safetensors"
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "c.vud"),
            "--format",
            "lora",
            "--base",
            str(src),
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["files"][0]["path"] == str(out) and rep["family"] == "ltx"
    assert rep["warnings"] == []  # the probed base itself
    meta = safe_open(str(out), "pt").metadata()
    mods = json.loads(meta["vpatch.modules"])
    assert all(len(m["base_sha256"]) == 64 for m in mods.values())
    assert base_warnings(out, src) == []
    # another base: a fine-tune of the same model
    other = tmp_path / "other"
    pipe = load(src)
    with torch.no_grad():
        pipe.transformer.caption_projection.linear_1.weight.mul_(1.01)
    pipe.save_pretrained(other, safe_serialization=True)
    warns = base_warnings(out, other)
    assert len(warns) == 1 and "caption_projection.linear_1" in warns[0]
    r = CliRunner().invoke(main, ["inspect", str(other), "--delta", str(out)])
    assert r.exit_code == 0 and "differs" in r.stdout + r.stderr
    # exported from that fine-tune, the LoRA said nothing of the base it was probed on
    cmd = ["export", str(tmp_path / "c.vud"), "--format", "lora", "--base", str(other)]
    r = CliRunner().invoke(main, [*cmd, "-o", str(tmp_path / "ft.safetensors")])
    warned = [x for x in r.stderr.splitlines() if x.startswith("warning: ")]
    assert r.exit_code == 0 and len(warned) == 1, r.stderr
    assert (
        "caption_projection.linear_1" in warned[0] and "differs from the probed base" in warned[0]
    )
    r = CliRunner().invoke(main, [*cmd, "-o", str(tmp_path / "ft2.safetensors"), "--json"])
    (w,) = json.loads(r.stdout)["warnings"]
    assert "caption_projection.linear_1" in w and "stored as" not in w
    # the same weights in bf16: every entry's bytes differ, and the warning says why, as apply's
    half = tmp_path / "half"
    load(src).to(torch.bfloat16).save_pretrained(half, safe_serialization=True)
    cmd = ["export", str(tmp_path / "c.vud"), "--format", "lora", "--base", str(half), "--json"]
    r = CliRunner().invoke(main, [*cmd, "-o", str(tmp_path / "half.safetensors")])
    warns = json.loads(r.stdout)["warnings"]
    assert r.exit_code == 0 and len(warns) == 3, warns
    assert all("(stored as BF16, probed from F32)" in x for x in warns), warns
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "lora" in r.stdout and "ltx" in r.stdout


def test_export_from_a_base_that_already_carries_the_delta_is_refused(pipes, tmp_path):
    """--base the patched model gave a LoRA (exit 0, no warning) that applies the edit a second
    time on it; apply refuses the same case."""
    src, _ = pipes("ltx")
    make_delta(src, "ltx", CASES[2][3], tmp_path / "c.vud")
    patched = tmp_path / "patched"
    patcher.apply_delta(src, tmp_path / "c.vud", patched)
    out = tmp_path / "twice.safetensors"
    r = CliRunner().invoke(
        main,
        ["export", str(tmp_path / "c.vud"), "--format", "lora", "--base", str(patched), "-o", str(out)],
    )  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "AlreadyApplied" in lines[0], r.output
    assert "second time" in lines[0] and not out.exists()


def test_import_lora_round_trip(pipes, tmp_path):
    src, _ = pipes("hunyuan")
    d = make_delta(src, "hunyuan", CASES[3][3], tmp_path / "c.vud")
    for target in ("diffusers", "comfyui"):
        lora = tmp_path / f"{target}.safetensors"
        export_lora(tmp_path / "c.vud", src, lora, target=target)
        r = CliRunner().invoke(
            main, ["import-lora", str(lora), "-o", str(tmp_path / f"{target}.vud")]
        )
        assert r.exit_code == 0, r.stderr
        back = read_delta(tmp_path / f"{target}.vud")
        assert sorted(e.key for e in back.entries) == sorted(e.key for e in d.entries)
        orig = {e.key: e for e in d.entries}
        for e in back.entries:
            o = orig[e.key]
            assert e.kind == "project_input" and e.strength == o.strength
            assert torch.allclose(e.V, o.V) and torch.allclose(e.U, o.U, atol=1e-6)
    assert lora_to_delta(tmp_path / "comfyui.safetensors").method["lora_target"] == "comfyui"


def test_base_in_comfyui_single_file_layout_gives_the_same_lora(pipes, tmp_path):
    """--base a ComfyUI repackaged single file (Wan's original names under diffusion_model.):
    the base tensors are found by apply's alias rules and the LoRA is the same as from the folder."""
    from safetensors.torch import save_file

    src, _ = pipes("wan")
    sd = load_file(src / "transformer" / "diffusion_pytorch_model.safetensors")
    ren = {}
    for k, v in sd.items():
        k2 = re.sub(r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0.", k)
        k2 = re.sub(r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2.", k2)
        ren["diffusion_model." + k2] = v
    single = tmp_path / "wan_comfy.safetensors"
    save_file(ren, single)
    make_delta(src, "wan", CASES[0][3], tmp_path / "c.vud")
    a = export_lora(tmp_path / "c.vud", src, tmp_path / "a.safetensors", target="comfyui")
    b = export_lora(tmp_path / "c.vud", single, tmp_path / "b.safetensors", target="comfyui")
    la, lb = load_file(a.files[0].path), load_file(b.files[0].path)
    assert set(la) == set(lb) and "diffusion_model.text_embedding.0.lora_B.weight" in la
    assert all(torch.equal(la[k], lb[k]) for k in la)
    assert base_warnings(b.files[0].path, src) == []  # same bytes, so the same base


def test_outputs_never_replace_inputs(pipes, tmp_path):
    src, _ = pipes("ltx")
    make_delta(src, "ltx", CASES[2][3], tmp_path / "c.vud")
    before = (tmp_path / "c.vud").read_bytes()
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "c.vud"),
            "--base",
            str(src),
            "-o",
            str(tmp_path / "c.vud"),
            "--overwrite",
        ],
    )
    assert r.exit_code == 2 and (tmp_path / "c.vud").read_bytes() == before
    out = tmp_path / "e.safetensors"
    export_lora(tmp_path / "c.vud", src, out)
    lb = out.read_bytes()
    r = CliRunner().invoke(main, ["import-lora", str(out), "-o", str(out), "--overwrite"])
    assert r.exit_code == 2 and "input" in r.stderr and out.read_bytes() == lb
