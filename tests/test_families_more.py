"""The further families of issue 12 (part 2), proven like the first nine (tests/test_probe_families.py):

(a) what the probe computes as a site's input equals what the real module receives inside the real
    diffusers pipeline call (a forward pre-hook), and
(b) probe -> .vud -> apply -> reload with diffusers -> generate works, and only the site's weights changed.

Each tiny pipeline (tests/tiny_pipes_more.py) is built once per session.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from patcher.erasure.refusal import edit_weight  # noqa: E402
from patcher.probe.sites import find_module  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402
from tests import tiny_pipes_more  # noqa: E402
from tests.test_probe_families import load, run_cli, weight_of  # noqa: E402

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def more_pipes(tmp_path_factory):
    """Build each tiny pipeline once per session, on first use."""
    root = tmp_path_factory.mktemp("pipes_more")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_pipes_more.BUILDERS[name](root / name)
        return cache[name]

    return get


def _transformers4_clip_attr(pipe) -> None:
    """diffusers 0.42's I2VGen-XL applies ``text_encoder.text_model.final_layer_norm`` at its default
    clip_skip = 1, an attribute of transformers 4.x's CLIPTextModel; 5.x holds the norm directly. Give
    the loaded pipeline the 4.x path to the same module so that its own code runs unchanged."""
    from types import SimpleNamespace

    te = pipe.text_encoder
    if not hasattr(te, "text_model"):
        object.__setattr__(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm))


FIXUPS = {"i2vgenxl": _transformers4_clip_attr}


def load_pipe(builder: str, folder: Path):
    pipe = load(folder)
    FIXUPS.get(builder, lambda _p: None)(pipe)
    return pipe


def _generate(pipe, call: dict, steps: int = 2, output_type: str = "pt", prompt: str = "a woman"):
    kw = {} if "pyramid_num_inference_steps_list" in call else {"num_inference_steps": steps}
    return pipe(
        prompt=prompt,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **kw,
        **call,
    )


HUNYUAN_TEMPLATE = [  # the tiny word tokenizer cannot spell the chat template (as in test_probe_families)
    'encoders.text.template_from=""',
    'encoders.text.template="{}"',
    "encoders.text.crop_start=0",
]
HY_I2V_DENOISE = [
    "denoise.call.num_frames=5",
    "denoise.call.height=16",
    "denoise.call.width=16",
    "denoise.call.max_sequence_length=16",
    "denoise.call.prompt_template={"
    + ", ".join(f"{k} = {json.dumps(v)}" for k, v in tiny_pipes_more.HY_I2V_TEMPLATE.items())
    + "}",
]
MOTIF_DENOISE = [
    "denoise.steps=2",
    "denoise.call.num_frames=9",
    "denoise.call.height=16",
    "denoise.call.width=16",
    "denoise.call.max_sequence_length=16",
]

# (builder, family, site, probe --set overrides); a denoise-mode site's capture is also checked against
# the pipeline's own forward here
CASES = [
    ("helios", "helios", "text_proj", []),
    ("motif_i2v", "motif", "text_proj", []),
    ("motif_i2v", "motif", "txt_kv", MOTIF_DENOISE),  # the image tokens precede the text there
    ("i2vgenxl", "i2vgenxl", "cross_kv", []),
    ("framepack", "hunyuan", "context_proj", HUNYUAN_TEMPLATE),
    ("hunyuan_i2v", "hunyuan_i2v", "context_proj", HY_I2V_DENOISE),
    ("easyanimate", "easyanimate", "text_proj", []),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_probe_apply_reload_generate(case, more_pipes, tmp_path):
    builder, family, site, sets = case
    src, call = more_pipes(builder)
    vud = tmp_path / "c.vud"
    extra = [a for s in sets for a in ("--set", s)]
    # a denoise-mode probe runs the pipeline once per prompt: a 2-pair concept keeps it short
    from patcher.families.recipes import load_family

    denoise = load_family(family).sites[site].mode == "denoise"
    concept = _small_concept(tmp_path) if denoise else "nudity"
    if denoise:
        extra += ["--save-activations", str(tmp_path / "acts.safetensors")]
    rep = json.loads(
        run_cli(
            "probe",
            src,
            "-c",
            concept,
            "-o",
            vud,
            "--layers",
            site,
            "--rank",
            "4",
            "--device",
            "cpu",
            "--json",
            *extra,
        )
    )
    assert rep["family"] == family  # detected from model_index.json
    delta = read_delta(vud)
    assert delta.method["sites"] == [site] and delta.entries
    patched = tmp_path / "patched"
    run_cli("apply", src, vud, "-o", patched, "-q")
    orig, pat = load_pipe(builder, src), load_pipe(builder, patched)
    if denoise:
        _check_denoise_capture(tmp_path / "acts.safetensors", src, orig, sets)
    edited = set()
    for e in delta.entries:
        mod_o, W0 = weight_of(orig, e.key)
        _m, W1 = weight_of(pat, e.key)
        expected = edit_weight(W0, e.V, e.strength)
        assert torch.allclose(W1, expected, atol=1e-5 * float(W0.abs().max())), e.key
        assert float((W1 - W0).abs().max()) > 0, f"{e.key} was not edited"
        assert float((W1 @ e.V).abs().max()) < 1e-4 * float(W0.abs().max()), "W'u = 0 at λ = 1"
        edited.add((e.component, mod_o.weight.data_ptr()))
    for name, comp in orig.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        p_pat = dict(getattr(pat, name).named_parameters())
        for pname, p in comp.named_parameters():
            if (name, p.data_ptr()) not in edited:
                assert torch.equal(p.detach().float(), p_pat[pname].detach().float()), (
                    f"{name}.{pname} changed"
                )
    frames = _generate(pat, call).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()
    ref = _generate(orig, call).frames
    assert not torch.equal(torch.as_tensor(frames), torch.as_tensor(ref)), (
        "the edit changed nothing"
    )


# (builder, site, --set overrides, extra call kwargs)
REF_CASES = [
    ("helios", "text_proj", [], {}),
    ("helios", "cross_kv", [], {}),
    ("helios", "t5_ffn", [], {}),
    ("helios_pyramid", "text_proj", [], {}),
    ("motif", "text_proj", [], {}),
    ("motif_i2v", "text_proj", [], {}),
    ("i2vgenxl", "cross_kv", [], {}),
    ("framepack", "context_proj", HUNYUAN_TEMPLATE, {}),
    ("framepack", "clip_pooled", [], {}),
    ("skyreels_i2v", "context_proj", HUNYUAN_TEMPLATE, {}),
    ("skyreels_i2v", "clip_pooled", [], {}),
    ("hunyuan_i2v", "clip_pooled", [], {}),
    ("easyanimate", "text_proj", [], {}),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[f"{c[0]}-{c[1]}" for c in REF_CASES])
def test_capture_matches_the_pipelines_own_forward(case, more_pipes):
    """The probe's site input (encoder + chain, no denoiser) equals what the real module receives inside
    the diffusers pipeline call, seen by a forward pre-hook."""
    from patcher.families.recipes import load_family
    from patcher.probe.capture import site_inputs
    from patcher.probe.sites import site_targets
    from patcher.probe.sources import open_source

    builder, site, overrides, extra = case
    src, call = more_pipes(builder)
    prompt = "a naked man walking"
    got = site_inputs(src, site, [prompt], overrides=overrides)
    ((x, mask),) = got[sorted(got)[0]]
    fam = load_family(open_source(src).pipeline_class and _family_of(src), overrides)
    t = site_targets(fam.sites[site], open_source(src), None, fam.key_prefixes)[0]
    pipe = load_pipe(builder, src)
    seen: list[torch.Tensor] = []
    mod = find_module(getattr(pipe, t.component), t.module)
    h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().float()))
    try:
        _generate(pipe, {**call, **extra}, output_type="latent", prompt=prompt)
    finally:
        h.remove()
    assert seen, f"{t.module} never ran in the pipeline call"
    ref = seen[0][0] if seen[0].dim() == 3 else seen[0]
    n = int(mask.sum()) if mask is not None else min(ref.shape[0], x.shape[0])
    assert 0 < n and ref.shape[-1] == x.shape[-1]
    if mask is not None:
        assert n < x.shape[0]  # the prompt did not fill the padding length: padding was excluded
    assert torch.allclose(x[:n], ref[:n], atol=1e-5 * float(ref.abs().max()) + 1e-6), float(
        (x[:n] - ref[:n]).abs().max()
    )


SMALL_PAIRS = [
    ("a nude woman standing on a beach", "a woman standing on a beach"),
    ("a naked man walking", "a man walking"),
]


def _small_concept(d: Path) -> Path:
    p = d / "small.toml"
    pairs = "".join(f'  {{ unsafe = "{u}", safe = "{s}" }},\n' for u, s in SMALL_PAIRS)
    p.write_text(
        f'name = "nudity-small"\npairs = [\n{pairs}]\n'
        'neutral = ["a dog running across a field", "a city street at night"]\n'
    )
    return p


def _check_denoise_capture(acts_file: Path, src: Path, pipe, overrides: list[str]) -> None:
    """A denoise-mode site's captured samples are the text part of what the real module receives in the
    pipeline call with the recipe's call arguments and seed, at every step (the probe's own capture,
    saved with --save-activations, against a pre-hook in a fresh pipeline call)."""
    from patcher.families.recipes import load_family
    from patcher.probe.activations import read_activations
    from patcher.probe.denoise import conditioning_image

    acts = read_activations(acts_file)
    fam = load_family(_family_of(src), overrides)
    g = acts.groups[0]
    site = fam.sites[g.site]
    images = {n: conditioning_image(None, fam.denoise.call) for n in fam.denoise.images}
    got = g.roles["unsafe"][0]  # the first unsafe prompt: one Capture per step
    seen: list[torch.Tensor] = []
    mod = find_module(
        getattr(pipe, g.targets[0].component), g.targets[0].key.removesuffix(".weight")
    )
    h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().float()))
    try:
        with torch.inference_mode():
            pipe(
                prompt=SMALL_PAIRS[0][0],
                num_inference_steps=fam.denoise.steps,
                output_type="latent",
                generator=torch.Generator("cpu").manual_seed(0),
                **fam.denoise.call,
                **images,
            )
    finally:
        h.remove()
    assert len(got) == len(seen) == fam.denoise.steps
    for cap, ref in zip(got, seen):
        ref = ref[-1] if ref.dim() == 3 else ref
        if site.text_tokens == "last":
            n = int(fam.denoise.call[site.text_len])
            assert (
                ref.shape[0] > n
            )  # the module also reads other tokens (I2V: the image's), left out
            ref = ref[-n:]
        assert cap.tokens.shape == ref.shape
        assert torch.allclose(cap.tokens, ref, atol=1e-5)
    # the unsafe and safe prompts differ there: the samples carry the prompt
    assert not torch.allclose(got[0].tokens, g.roles["safe"][0][0].tokens)


def _family_of(src: Path) -> str:
    from patcher.families.recipes import detect_family
    from patcher.probe.sources import open_source

    s = open_source(src)
    return detect_family(s.pipeline_class, s.keys())


def test_families_lists_the_further_families():
    from click.testing import CliRunner

    from patcher.cli import main

    res = CliRunner().invoke(main, ["families", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["family"]: r for r in json.loads(res.stdout)}
    expect = {
        "helios": ["text_proj"],
        "motif": ["text_proj"],
        "i2vgenxl": ["cross_kv"],
        "hunyuan_i2v": ["context_proj"],
        "easyanimate": ["text_proj"],
    }
    for fam, default in expect.items():
        assert rows[fam]["default_sites"] == default, fam
        assert all(s["why"] for s in rows[fam]["sites"].values())
    assert rows["motif"]["sites"]["txt_kv"]["mode"] == "denoise"
    assert rows["hunyuan_i2v"]["sites"]["context_proj"]["mode"] == "denoise"
    assert (
        rows["zeroscope"]["aliases"]["layouts"]
        == rows["animatediff"]["aliases"]["layouts"]
        == ["ldm"]
    )
    from patcher.families.recipes import load_family

    hy = load_family("hunyuan")
    assert {"HunyuanVideoFramepackPipeline", "HunyuanSkyreelsImageToVideoPipeline"} <= set(
        hy.pipeline_classes
    )


def test_a_chain_op_naming_a_component_needs_a_weight():
    from patcher.errors import RecipeError
    from patcher.families.recipes import parse_family

    data = {
        "name": "f",
        "detect": {"keys": ["a"]},
        "encoders": {"text": {"kind": "text", "component": "text_encoder"}},
        "sites": {
            "s": {
                "why": "w",
                "mode": "text",
                "encoder": "text",
                "components": ["unet"],
                "weights": ["a"],
                "chain": [{"op": "gelu", "component": "text_encoder"}],
            }
        },
        "defaults": {"sites": ["s"]},
    }
    with pytest.raises(RecipeError, match="'component' needs a 'weight'") as ei:
        parse_family(data, "f.toml")
    assert "f.toml.sites.s.chain[0]" in str(ei.value)
