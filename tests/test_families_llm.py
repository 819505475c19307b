"""LLM-conditioned video families whose prompts go through the pipeline's own ``encode_prompt``
(``kind = "pipeline"`` encoders): LTX-2, HunyuanVideo 1.5, Kandinsky 5, Sana-Video.

Each family is proven the way tests/test_probe_families.py proves the others: the probe's captured
site input equals what the real module receives inside the real pipeline call, and probe -> apply ->
reload with diffusers -> generate works with only the site's weights changed.
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
from patcher.families.recipes import load_family  # noqa: E402
from patcher.probe.sites import find_module  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402
from tests import tiny_pipes_llm  # noqa: E402
from tests.test_probe_families import load, run_cli, weight_of  # noqa: E402

warnings.filterwarnings("ignore")

PROMPT = (
    "a naked man walking"  # shorter than every tiny pipeline's text length: nothing is truncated
)


@pytest.fixture(scope="session")
def llm_pipes(tmp_path_factory):
    """Build each tiny pipeline once per session, on first use."""
    root = tmp_path_factory.mktemp("llm_pipes")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_pipes_llm.BUILDERS[name](root / name)
        return cache[name]

    return get


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


# (case id, builder, family, site, recipe overrides, extra pipeline call kwargs)
LTX2 = [f"encoders.{e}.kwargs.max_sequence_length=16" for e in ("text", "audio", "llm")]
CASES = [
    ("ltx2-caption_proj", "ltx2", "ltx2", "caption_proj", LTX2, {}),
    ("ltx2-audio_caption_proj", "ltx2", "ltx2", "audio_caption_proj", LTX2, {}),
    ("ltx2-cross_kv", "ltx2", "ltx2", "cross_kv", LTX2, {}),
    ("ltx2-connector_in", "ltx2", "ltx2", "connector_in", LTX2, {}),
    ("ltx23-connector_in", "ltx23", "ltx2", "connector_in", LTX2, {}),
    ("hunyuan15-context_proj", "hunyuan15", "hunyuan15", "context_proj", [], {}),
    ("kandinsky5-text_embed", "kandinsky5", "kandinsky5", "text_embed", [], {}),
    ("kandinsky5-clip_pooled", "kandinsky5", "kandinsky5", "clip_pooled", [], {}),
    (
        "sana_video-cross_kv",
        "sana_video",
        "sana_video",
        "cross_kv",
        ["encoders.text.kwargs.max_sequence_length=16"],
        {},
    ),
    (
        "sana_video-caption_proj",
        "sana_video",
        "sana_video",
        "caption_proj",
        ["encoders.text.kwargs.max_sequence_length=16"],
        {},
    ),
]


def _call(pipe, call: dict, extra: dict, output_type: str):
    return pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **{**call, **extra},
    )


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_capture_matches_the_pipelines_own_forward(case, llm_pipes):
    """The site input the probe computes (the pipeline's encode_prompt + the recipe's chain, no
    denoiser) equals what the real module receives inside the diffusers pipeline call."""
    from patcher.probe.capture import site_inputs
    from patcher.probe.sites import site_targets
    from patcher.probe.sources import open_source

    _id, builder, family, site, overrides, extra = case
    src, call = llm_pipes(builder)
    got = site_inputs(src, site, [PROMPT], overrides=overrides)
    ((x, mask),) = got[sorted(got)[0]]
    fam = load_family(family, overrides)
    t = site_targets(fam.sites[site], open_source(src), None, fam.key_prefixes)[0]
    pipe = load(src)
    seen: list[torch.Tensor] = []
    mod = find_module(getattr(pipe, t.component), t.module)
    h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().float()))
    try:
        _call(pipe, call, extra, "latent")
    finally:
        h.remove()
    assert seen, f"{t.module} was not called by the pipeline"
    ref = seen[0][-1] if seen[0].dim() == 3 else seen[0]  # under guidance the prompt's row is last
    assert ref.shape == x.shape, (ref.shape, x.shape)
    if mask is not None:  # the probe keeps the valid tokens only: some, not all
        assert 0 < int(mask.sum()) < mask.shape[0]
    assert torch.allclose(x, ref, atol=1e-5 * float(ref.abs().max()) + 1e-6), float(
        (x - ref).abs().max()
    )


# probe -> apply -> generate once per family, at its default site (the other sites differ only in
# which weights are matched, and each is verified against the pipeline above)
APPLY_CASES = [c for c in CASES if c[3] == load_family(c[2]).default_sites[0]]
APPLY_CASES.append(next(c for c in CASES if c[1] == "ltx23"))  # LTX-2.3 has no caption_projection


@pytest.mark.parametrize("case", APPLY_CASES, ids=[c[0] for c in APPLY_CASES])
def test_probe_apply_reload_generate(case, llm_pipes, tmp_path):
    _id, builder, family, site, overrides, extra = case
    src, call = llm_pipes(builder)
    vud = tmp_path / "c.vud"
    rep = json.loads(
        run_cli(
            "probe",
            src,
            "-c",
            "nudity",
            "-o",
            vud,
            "--layers",
            site,
            "--rank",
            "4",
            "--device",
            "cpu",
            "--json",
            *sets(*overrides),
        )
    )
    assert rep["family"] == family  # detected from model_index.json (no --family given)
    delta = read_delta(vud)
    assert delta.method["sites"] == [site] and delta.entries

    patched = tmp_path / "patched"
    run_cli("apply", src, vud, "-o", patched, "-q")
    orig, pat = load(src), load(patched)
    edited = set()
    for e in delta.entries:
        mod_o, W0 = weight_of(orig, e.key)
        _mod_p, W1 = weight_of(pat, e.key)
        expected = edit_weight(W0, e.V, e.strength)
        assert torch.allclose(W1, expected, atol=1e-5 * float(W0.abs().max()))
        assert float((W1 - W0).abs().max()) > 0, f"{e.key} was not edited"
        assert float((W1 @ e.V).abs().max()) < 1e-4 * float(W0.abs().max()), "W'u = 0 at λ = 1"
        edited.add((e.component, mod_o.weight.data_ptr()))
    for name, comp in orig.components.items():  # nothing else changed, in any component
        if not isinstance(comp, torch.nn.Module):
            continue
        p_pat = dict(getattr(pat, name).named_parameters())
        for pname, p in comp.named_parameters():
            if (name, p.data_ptr()) not in edited:
                assert torch.equal(p.detach(), p_pat[pname].detach()), f"{name}.{pname} changed"
    frames = _call(pat, call, extra, "pt").frames
    assert torch.isfinite(torch.as_tensor(frames)).all()


TRIP_CASES = [("ltx2", "caption_proj", LTX2)]  # the one with a diffusers module (connectors) loaded


@pytest.mark.parametrize("case", TRIP_CASES, ids=[c[0] for c in TRIP_CASES])
def test_pipeline_encoder_never_builds_the_denoiser_or_vae(case, llm_pipes, tmp_path, monkeypatch):
    """A pipeline-kind encoder constructs the pipeline class itself, with only its text components:
    no diffusers model other than those (LTX-2's connectors) is ever built."""
    import diffusers

    builder, site, overrides = case
    src, _call_kw = llm_pipes(builder)
    index = json.loads((src / "model_index.json").read_text())
    forbidden = {index[c][1] for c in ("transformer", "vae") if c in index}
    assert len(forbidden) == 2
    built: list[str] = []
    orig_init = diffusers.ModelMixin.__init__

    def tripwire(self, *a, **k):
        built.append(type(self).__name__)
        if type(self).__name__ in forbidden:
            raise AssertionError(f"{type(self).__name__} was built")
        orig_init(self, *a, **k)

    def no_pipeline(*_a, **_k):
        raise AssertionError("a pipeline was loaded with from_pretrained")

    monkeypatch.setattr(diffusers.ModelMixin, "__init__", tripwire)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_pipeline)
    run_cli(
        "probe",
        src,
        "-c",
        "nudity",
        "-o",
        tmp_path / "t.vud",
        "--layers",
        site,
        "--rank",
        "2",
        "-q",
        *sets(*overrides),
    )
    assert read_delta(tmp_path / "t.vud").entries
    assert not set(built) & forbidden
    # the tripwire is live: building the denoiser trips it
    with pytest.raises(AssertionError, match="was built"):
        getattr(diffusers, sorted(forbidden)[0]).from_pretrained(
            src / next(c for c in ("transformer", "vae") if index[c][1] == sorted(forbidden)[0])
        )


def test_ltx2_single_file_aliases_agree_with_diffusers_converter():
    """LTX-2's original single file keeps the text readers' diffusers names under a prefix: every
    key our rules try with a prefix comes back at the diffusers key through diffusers' own
    single-file converter (an independent oracle for the recipe's [aliases])."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from patcher.layouts import rules_for

    rules = rules_for("ltx2")
    keys = [
        "caption_projection.linear_1.weight",
        "audio_caption_projection.linear_1.weight",
        "transformer_blocks.0.attn2.to_k.weight",
        "transformer_blocks.3.attn2.to_v.weight",
    ]
    tried = 0
    for i, key in enumerate(keys):
        for stored, _rule, how in rules.candidates(key):
            if "prefix" not in how or "without" in how:
                continue
            block = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
            out = sfu.convert_ltx2_transformer_to_diffusers({stored: block})
            if stored.startswith("model.diffusion_model."):  # the converter's own prefix
                assert list(out) == [key] and torch.equal(out[key], block), (stored, list(out))
                tried += 1
            else:  # ComfyUI's "diffusion_model." wrapper: the same names once it is removed
                assert stored.removeprefix("diffusion_model.") == key
    assert tried == len(keys)


@pytest.mark.parametrize("builder", ["ltx2", "hunyuan15", "kandinsky5", "sana_video"])
def test_every_pipeline_class_of_the_family_encodes_the_same(builder, llm_pipes, tmp_path):
    """I2V / condition pipelines share the family's text path: with model_index.json naming each
    pipeline class the recipe claims, detection picks the family and the pipeline encoder (that
    class's own encode_prompt, built without its denoiser, VAE or image encoder) gives the same site
    input as the T2V class."""
    import shutil

    from patcher.families.recipes import detect_family
    from patcher.probe.capture import site_inputs

    src, _call_kw = llm_pipes(builder)
    fam = load_family(builder)
    site = fam.default_sites[0]
    overrides = next(c[4] for c in CASES if c[1] == builder)
    ((x0, m0),) = next(iter(site_inputs(src, site, [PROMPT], overrides=overrides).values()))
    index = json.loads((src / "model_index.json").read_text())
    others = [c for c in fam.pipeline_classes if c != index["_class_name"]]
    assert others, f"{builder}: the recipe names only {fam.pipeline_classes}"
    for cls in others:
        assert detect_family(cls, set()) == builder
        d = tmp_path / cls
        d.mkdir()
        for sub in (*fam.encoders[fam.sites[site].encoder].pipeline.components, "transformer"):
            (d / sub).symlink_to(src / sub, target_is_directory=True)
        (d / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
        ((x, m),) = next(iter(site_inputs(d, site, [PROMPT], overrides=overrides).values()))
        assert torch.equal(x, x0) and (m is None) == (m0 is None), cls
        shutil.rmtree(d)


def test_twin_on_a_pipeline_encoder_is_one_line(llm_pipes, tmp_path):
    """The twin map aligns tokenizer tokens, which a pipeline's own encoding does not expose."""
    from click.testing import CliRunner

    from patcher.cli import main

    src, _ = llm_pipes("sana_video")
    out = tmp_path / "t.vud"
    res = CliRunner().invoke(
        main, ["probe", str(src), "-c", "nudity", "-o", str(out), "--method", "twin"]
    )
    lines = [ln for ln in res.output.splitlines() if ln.startswith("vpatch:")]
    assert res.exit_code == 2 and len(lines) == 1 and "pipeline's own encoding" in lines[0], (
        res.output
    )
    assert not out.exists()


def test_single_file_detection_prefers_the_most_specific_family(llm_pipes):
    """An LTX-2 or Sana-Video file also holds LTX-Video's two detection keys; its own family claims it."""
    from safetensors import safe_open

    from patcher.families.recipes import detect_family

    # LTX-2's original single file (prefixed); Sana-Video has none: its bare transformer file
    for builder, prefix in (("ltx2", "model.diffusion_model."), ("sana_video", "")):
        src, _ = llm_pipes(builder)
        with safe_open(str(src / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            keys = {f"{prefix}{k}" for k in f.keys()}
        assert {"caption_projection.linear_1.weight", "transformer_blocks.0.attn2.to_k.weight"} <= {
            k.removeprefix("model.diffusion_model.") for k in keys
        }
        assert detect_family(None, keys) == builder
    # LTX-Video's own keys still detect LTX-Video
    ltx = {"caption_projection.linear_1.weight", "transformer_blocks.0.attn2.to_k.weight"}
    assert detect_family(None, ltx) == "ltx"


def test_ltx2_original_single_file_probes_with_the_text_stack_from_a_folder(llm_pipes, tmp_path):
    """An LTX-2 original single file (prefixed keys, no text stack): detected by its keys, its text
    comes from --encoder text=FOLDER through that folder's pipeline encode_prompt + connectors, the
    delta names the stored key, and the direction is the folder probe's."""
    from safetensors.torch import load_file, save_file

    src, _ = llm_pipes("ltx2")
    sd = load_file(str(src / "transformer" / "diffusion_pytorch_model.safetensors"))
    single = tmp_path / "ltx-2-19b-dev.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(single))
    args = ["-c", "nudity", "--rank", "4", "-q", *sets(*LTX2)]
    run_cli("probe", single, "-o", tmp_path / "s.vud", "--encoder", f"text={src}", *args)
    run_cli("probe", src, "-o", tmp_path / "f.vud", *args)
    ((es,), (ef,)) = read_delta(tmp_path / "s.vud").entries, read_delta(tmp_path / "f.vud").entries
    assert es.tensor_key == "model.diffusion_model.caption_projection.linear_1.weight"
    assert ef.tensor_key == "caption_projection.linear_1.weight"
    assert torch.allclose(es.V, ef.V, atol=1e-5) and torch.allclose(es.U, ef.U, atol=1e-5)
    run_cli("apply", single, tmp_path / "s.vud", "-o", tmp_path / "safe.safetensors", "-q")
    out = load_file(str(tmp_path / "safe.safetensors"))
    key = es.tensor_key
    assert torch.allclose(
        out[key], edit_weight(sd[key.removeprefix("model.diffusion_model.")], es.V, 1.0), atol=1e-5
    )
    assert all(
        torch.equal(out[f"model.diffusion_model.{k}"], v)
        for k, v in sd.items()
        if f"model.diffusion_model.{k}" != key
    )
