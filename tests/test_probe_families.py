"""probe -> .vud -> apply -> reload with diffusers, on a tiny offline instance of every family.

For each case the CLI probes a saved pipeline folder, the CLI applies the delta, and then both the
original and the patched folders are loaded by diffusers. The patched modules must equal the same
edit done in memory on the original weights, everything else must be unchanged, and the patched
pipeline must still generate.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests import tiny_pipes  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from patcher.cli import main  # noqa: E402
from patcher.delta import read_delta  # noqa: E402
from patcher.probe import _find_module  # noqa: E402
from patcher.refusal import edit_weight  # noqa: E402

warnings.filterwarnings("ignore")

HUNYUAN_TEMPLATE = ['encoders.text.template_from=""', 'encoders.text.template="{}"', "encoders.text.crop_start=0"]
COG_DENOISE = ["denoise.steps=2", "denoise.call.max_sequence_length=16", "denoise.call.num_frames=8",
               "denoise.call.height=16", "denoise.call.width=16"]


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    """Build each tiny pipeline once per session, on first use."""
    root = tmp_path_factory.mktemp("pipes")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str, **kw):
        key = name + json.dumps(kw, sort_keys=True)
        if key not in cache:
            builder = tiny_pipes.wan if name == "wan2" else tiny_pipes.BUILDERS[name]
            if name == "wan2":
                kw = {"two_experts": True, **kw}
            cache[key] = builder(root / key.replace("{", "").replace("}", "").replace('"', "").replace(":", "_").replace(" ", ""), **kw)
        return cache[key]
    return get


def run_cli(*args: str) -> dict | str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, f"vpatch {' '.join(map(str, args))} failed ({res.exit_code}):\n{res.output}\n{res.exception!r}"
    return res.stdout


def load(folder: Path):
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_of(pipe, key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    comp, tkey = key.split("/", 1)
    mod = _find_module(getattr(pipe, comp), tkey.removeprefix("text_model.").removesuffix(".weight"))
    return mod, mod.weight.detach().float()


# (case id, builder, family, site, extra probe args)
CASES = [
    ("wan-text_proj", "wan", "wan", "text_proj", []),
    ("wan-cross_kv", "wan", "wan", "cross_kv", []),
    ("wan-t5_ffn", "wan", "wan", "t5_ffn", []),
    ("wan22-two-experts", "wan2", "wan", "text_proj", []),
    ("zeroscope-cross_kv", "zeroscope", "zeroscope", "cross_kv", []),
    ("zeroscope-clip_mlp", "zeroscope", "zeroscope", "clip_mlp", []),
    ("cogvideox-sharded-text_proj", "cogvideox", "cogvideox", "text_proj", []),
    ("cogvideox-joint_kv-denoise", "cogvideox", "cogvideox", "joint_kv", [a for s in COG_DENOISE for a in ("--set", s)]),
    ("ltx-caption_proj", "ltx", "ltx", "caption_proj", []),
    ("ltx-cross_kv", "ltx", "ltx", "cross_kv", []),
    ("hunyuan-context_proj", "hunyuan", "hunyuan", "context_proj", [a for s in HUNYUAN_TEMPLATE for a in ("--set", s)]),
    ("hunyuan-clip_pooled", "hunyuan", "hunyuan", "clip_pooled", []),
    ("mochi-bf16-caption_proj", "mochi", "mochi", "caption_proj", []),
    ("animatediff-cross_kv", "animatediff", "animatediff", "cross_kv", []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_probe_apply_reload_generate(case, pipes, tmp_path):
    _id, builder, family, site, extra = case
    src, call = pipes(builder)
    vud = tmp_path / "c.vud"
    out = run_cli("probe", src, "-c", "nudity", "-o", vud, "--layers", site, "--rank", "4", "--device", "cpu", "--json", *extra)
    rep = json.loads(out)
    assert rep["family"] == family  # detected from model_index.json (no --family given)
    assert vud.is_file() and rep["delta_sha256"] == read_delta(vud).sha256
    delta = read_delta(vud)
    assert delta.method["name"] == "cpca" and delta.method["sites"] == [site]
    assert delta.concept["name"] == "nudity" and len(delta.concept["pairs"]) == 5

    patched = tmp_path / "patched"
    run_cli("apply", src, vud, "-o", patched, "-q")
    orig, pat = load(src), load(patched)

    edited = set()
    for e in delta.entries:
        assert e.kind == "project_input" and e.strength == 1.0
        mod_o, W0 = weight_of(orig, e.key)
        mod_p, W1 = weight_of(pat, e.key)
        stored = next(p for p in getattr(orig, e.component).parameters() if p is mod_o.weight).dtype
        expected = edit_weight(W0, e.V, e.strength)
        # stored dtype may be bf16: compare against the in-memory edit rounded the same way
        expected_stored = expected.to(torch.bfloat16 if e.base_dtype == "BF16" else torch.float32).float()
        tol = 1e-2 if e.base_dtype == "BF16" else 1e-5
        assert torch.allclose(W1, expected_stored, atol=tol * float(W0.abs().max()), rtol=0), e.key
        assert float((W1 - W0).abs().max()) > 0, f"{e.key} was not edited"
        if e.base_dtype != "BF16":
            assert float((W1 @ e.V).abs().max()) < 1e-4 * float(W0.abs().max()), "W'u = 0 at λ = 1"
        x = torch.randn(3, W0.shape[1], generator=torch.Generator().manual_seed(0))
        ref = torch.nn.functional.linear(x, expected_stored, None if mod_o.bias is None else mod_o.bias.detach().float())
        with torch.no_grad():
            assert torch.allclose(mod_p.float()(x), ref, atol=1e-4 * float(ref.abs().max()) + 1e-6)
        edited.add((e.component, mod_o.weight.data_ptr()))
        del stored

    # nothing else changed, in any component
    for name, comp in orig.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        p_pat = dict(getattr(pat, name).named_parameters())
        for pname, p in comp.named_parameters():
            if (name, p.data_ptr()) in edited:
                continue
            assert torch.equal(p.detach().float(), p_pat[pname].detach().float()), f"{name}.{pname} changed"

    # the patched pipeline still generates
    kw = dict(call)
    if builder == "hunyuan":
        kw["prompt_template"] = {"template": "{}", "crop_start": 0}
    frames = pat(prompt="a woman standing on a beach", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **kw).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()


def test_wan22_edits_both_experts(pipes, tmp_path):
    src, _ = pipes("wan2")
    vud = tmp_path / "c.vud"
    run_cli("probe", src, "-c", "nudity", "-o", vud, "--rank", "4", "-q")
    comps = sorted(e.component for e in read_delta(vud).entries)
    assert comps == ["transformer", "transformer_2"]
    # each expert's U is computed from its own weight
    e1, e2 = read_delta(vud).entries
    assert not torch.allclose(e1.U, e2.U)


def test_i2v_image_conditioning_site(pipes, tmp_path):
    from PIL import Image

    src, call = pipes("wan_i2v")
    colours = {"red": (220, 20, 20), "white": (240, 240, 240), "blue": (20, 20, 220), "green": (20, 200, 20), "grey": (128, 128, 128)}
    for name, rgb in colours.items():
        img = Image.new("RGB", (32, 32), rgb)
        for i in range(0, 32, 4):  # some texture, so the pairs differ in more than a constant
            img.putpixel((i, i), (0, 0, 0))
        img.save(tmp_path / f"{name}.png")
    pairs = "\n".join(f'  {{ unsafe = "a ball {i}", safe = "a plain ball {i}", unsafe_image = "red.png", safe_image = "white.png" }},'
                      for i in range(5))
    (tmp_path / "red.toml").write_text(
        f'name = "red-image"\npairs = [\n{pairs}\n]\nneutral = ["a box", "a tree"]\n'
        'neutral_images = ["blue.png", "green.png", "grey.png"]\n')
    vud = tmp_path / "img.vud"
    out = json.loads(run_cli("probe", src, "-c", tmp_path / "red.toml", "-o", vud, "--layers", "image_kv", "--rank", "2", "--json"))
    assert {g["site"] for g in out["groups"]} == {"image_kv"}
    delta = read_delta(vud)
    assert sorted(e.tensor_key for e in delta.entries) == [f"blocks.{i}.attn2.add_{kv}_proj.weight" for i in (0, 1) for kv in "kv"]
    patched = tmp_path / "patched"
    run_cli("apply", src, vud, "-o", patched, "-q")
    orig, pat = load(src), load(patched)
    for e in delta.entries:
        _m, W0 = weight_of(orig, e.key)
        _m, W1 = weight_of(pat, e.key)
        assert torch.allclose(W1, edit_weight(W0, e.V, 1.0), atol=1e-5)
    frames = pat(image=Image.open(tmp_path / "red.png"), prompt="a ball", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **call).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()
