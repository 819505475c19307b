"""Wan 2.2 TI2V-5B, the Wan-derived pipelines (VACE, ChronoEdit), SkyReels-V2, Cosmos Predict 2 and
2.5, Allegro and Latte, proven as tests/test_probe_families.py proves the first nine:

(a) what the probe computes as a site's input equals what the real module receives inside the real
    diffusers pipeline call (a forward pre-hook), and
(b) probe -> .vud -> apply -> reload with diffusers -> generate works, the site's weights are edited
    exactly as the in-memory edit says, and nothing else changed.
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
from tests import tiny_pipes_t5 as tiny  # noqa: E402
from tests.test_probe_families import run_cli  # noqa: E402

warnings.filterwarnings("ignore")

PROMPT = "a naked man walking"  # lower case (Allegro and Latte lower-case prompts) and short


@pytest.fixture(scope="session")
def pipes5(tmp_path_factory):
    """Build each tiny pipeline once per session, on first use."""
    root = tmp_path_factory.mktemp("pipes5")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            cache[name] = tiny.BUILDERS[name](root / name)
        return cache[name]

    return get


@pytest.fixture
def guardrail_stand_in(monkeypatch):
    """Cosmos 2.5's constructor builds NVIDIA's guardrail when none is passed (cosmos_guardrail is not a
    test dependency): the pipeline encoder, which constructs the class, gets the stand-in instead."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict as c25

    monkeypatch.setattr(c25, "CosmosSafetyChecker", tiny.DummySafetyChecker)


def load(folder: Path):
    from diffusers import DiffusionPipeline

    kw = {}
    if json.loads((folder / "model_index.json").read_text())["_class_name"].startswith("Cosmos"):
        kw["safety_checker"] = tiny.DummySafetyChecker()
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_pipe(pipe, call: dict, output_type: str, steps: int = 2, prompt: str = PROMPT):
    return pipe(
        prompt=prompt,
        num_inference_steps=steps,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **call,
    )


def hooked(pipe, component: str, module: str, call: dict, steps: int = 1) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    mod = find_module(getattr(pipe, component), module)
    h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().float()))
    try:
        with torch.no_grad():
            call_pipe(pipe, call, "latent", steps)
    finally:
        h.remove()
    assert seen, f"{module} never ran in the pipeline call"
    return seen


# ------------------------------------------------------------------------------------------ (a)

# (builder, family, site, the module hooked in the pipeline: None = the site's first target)
REF_CASES = [
    ("wan22_5b", "wan", "text_proj", None),
    ("wan22_5b_i2v", "wan", "text_proj", None),
    ("wan_vace", "wan", "cross_kv", "vace_blocks.1.attn2.to_k"),  # VACE's own cross-attention
    ("chronoedit", "wan", "text_proj", None),
    ("wan_animate", "wan", "cross_kv", "blocks.1.attn2.to_k"),
    ("skyreels_v2", "wan", "cross_kv", "blocks.1.attn2.to_v"),
    ("skyreels_v2_i2v", "wan", "text_proj", None),
    ("skyreels_v2_df", "wan", "text_proj", None),
    ("skyreels_v2_df_i2v", "wan", "text_proj", None),
    ("skyreels_v2_df_v2v", "wan", "text_proj", None),
    ("cosmos2", "cosmos", "cross_kv", "transformer_blocks.1.attn2.to_k"),
    ("cosmos2", "cosmos", "t5_ffn", None),  # hooked inside the text encoder
    ("cosmos2_t2i", "cosmos", "cross_kv", None),
    ("cosmos25", "cosmos25", "crossattn_proj", None),
    ("cosmos25", "cosmos25", "cross_kv", "transformer_blocks.1.attn2.to_v"),
    ("allegro", "allegro", "caption_proj", None),
    ("allegro", "allegro", "cross_kv", None),
    ("latte", "latte", "caption_proj", None),
    ("latte", "latte", "cross_kv", None),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[f"{c[0]}-{c[2]}" for c in REF_CASES])
def test_capture_matches_the_pipelines_own_forward(case, pipes5, guardrail_stand_in):
    """Text mode (encoder + chain, no denoiser) gives exactly what the real module reads in the pipeline."""
    from patcher.families.recipes import load_family
    from patcher.probe.capture import site_inputs
    from patcher.probe.sites import site_targets
    from patcher.probe.sources import open_source

    builder, family, site, module = case
    src, call = pipes5(builder)
    got = site_inputs(src, site, [PROMPT])  # the family is detected from model_index.json
    ((x, mask),) = got[sorted(got)[0]]
    fam = load_family(family)
    ts = site_targets(fam.sites[site], open_source(src), None, fam.key_prefixes)
    t = ts[0]
    if builder == "latte" and site == "cross_kv":  # temporal blocks have no cross-attention
        assert [u.module for u in ts] == [f"transformer_blocks.0.attn2.to_{kv}" for kv in "kv"]
    if module is not None:  # a later block: every target of the site reads the same input
        assert any(u.module == module for u in ts), (module, [u.module for u in ts])
    seen = hooked(load(src), t.component, module or t.module, call)
    # (batch, tokens, width), Allegro's (batch, 1, tokens, width): the conditional half if batched
    ref = seen[0].reshape(-1, *seen[0].shape[-2:])[-1]
    if mask is None:  # every position is read
        # Latte keeps only the valid tokens; Cosmos 2.5 masks none and its VLM is causal (the first
        # positions do not see the padding after them)
        n = ref.shape[0]
        assert x.shape[0] == (512 if family == "cosmos25" else n)
    else:
        n = int(mask.sum())
        assert 0 < n < 16
    assert ref.shape[-1] == x.shape[-1]
    assert torch.allclose(x[:n], ref[:n], atol=1e-5 * float(ref.abs().max()) + 1e-6), float(
        (x[:n] - ref[:n]).abs().max()
    )


@pytest.mark.parametrize("builder", ["allegro", "latte"])
def test_pipeline_encoder_applies_the_pipelines_own_prompt_preprocessing(builder, pipes5):
    """Allegro and Latte lower-case the prompt before T5: so does the probe (their own encode_prompt),
    while the plain T5 tokenizer would see other tokens."""
    from patcher.probe.capture import site_inputs

    src, _call = pipes5(builder)
    got = site_inputs(src, "caption_proj", [PROMPT, PROMPT.upper(), "a clothed man walking"])
    ((x, _), (xu, _), (xo, _)) = next(iter(got.values()))
    assert torch.equal(x, xu) and x.shape == xu.shape
    assert not torch.equal(x[: xo.shape[0]], xo[: x.shape[0]])  # the check can tell prompts apart
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
    assert tok(PROMPT).input_ids != tok(PROMPT.upper()).input_ids


@pytest.mark.parametrize("builder", ["chronoedit", "skyreels_v2_i2v"])
def test_image_capture_matches_the_pipelines_own_forward(builder, pipes5, tmp_path):
    """The image site (CLIP penultimate layer through image_embedder) of the Wan-derived I2V pipelines."""
    from patcher.probe.capture import site_inputs

    src, call = pipes5(builder)
    call["image"].save(tmp_path / "i.png")
    ((x, mask),) = next(iter(site_inputs(src, "image_kv", [tmp_path / "i.png"]).values()))
    seen = hooked(load(src), "transformer", "blocks.0.attn2.add_k_proj", call)
    assert mask is None and seen[0][0].shape == x.shape
    assert torch.allclose(x, seen[0][0], atol=1e-5)


# ------------------------------------------------------------------------------------------ (b)

# (builder, family, site, extra probe args, output_type of the final generation). The T5 families
# encode at 64 tokens instead of 512 here (the concept prompts are shorter and padding is masked: the
# same delta, checked, for a quarter of the encoder's work), Cosmos 2.5 at its tiny pipeline's 48; the
# capture tests above run the recipes as shipped. ChronoEdit's folder is Wan I2V's (same keys, same
# apply), proven end to end in tests/test_probe_families.py; its captures are checked above.
T5_64 = ["--set", "encoders.text.max_length=64"]
ALLEGRO_64 = ["--set", "encoders.text.kwargs.max_sequence_length=64"]
COSMOS25_48 = ["--set", "encoders.text.kwargs.max_sequence_length=48"]
E2E_CASES = [
    ("wan22_5b", "wan", "text_proj", T5_64, "pt"),
    ("wan_vace", "wan", "cross_kv", T5_64, "pt"),
    ("wan_animate", "wan", "cross_kv", T5_64, "latent"),
    ("skyreels_v2", "wan", "cross_kv", T5_64, "pt"),
    ("cosmos2", "cosmos", "cross_kv", T5_64, "pt"),
    ("allegro", "allegro", "caption_proj", ALLEGRO_64, "latent"),  # its VAE decodes only tiled
    ("latte", "latte", "caption_proj", [], "pt"),  # encode_prompt keeps only the valid tokens
    ("cosmos25", "cosmos25", "crossattn_proj", COSMOS25_48, "pt"),
]


def _probe_apply_reload_generate(src: Path, call: dict, family, site, extra, out_type, tmp_path):
    vud = tmp_path / "c.vud"
    rep = json.loads(
        run_cli(
            *("probe", src, "-c", "nudity", "-o", vud, "--layers", site),
            *("--rank", "4", "--device", "cpu", "--json", *extra),
        )
    )
    assert rep["family"] == family  # detected from model_index.json
    delta = read_delta(vud)
    assert delta.method["sites"] == [site] and rep["delta_sha256"] == delta.sha256
    patched = tmp_path / "patched"
    run_cli("apply", src, vud, "-o", patched, "-q")
    orig, pat = load(src), load(patched)
    edited = set()
    for e in delta.entries:
        assert e.kind == "project_input" and e.strength == 1.0
        comp, tkey = e.key.split("/", 1)
        mod_o = find_module(getattr(orig, comp), tkey.removesuffix(".weight"))
        mod_p = find_module(getattr(pat, comp), tkey.removesuffix(".weight"))
        W0, W1 = mod_o.weight.detach().float(), mod_p.weight.detach().float()
        expected = edit_weight(W0, e.V, 1.0)
        assert torch.allclose(W1, expected, atol=1e-5 * float(W0.abs().max())), e.key
        assert float((W1 - W0).abs().max()) > 0, f"{e.key} was not edited"
        assert float((W1 @ e.V).abs().max()) < 1e-4 * float(W0.abs().max()), "W'u = 0 at λ = 1"
        edited.add((comp, tkey))
    for name, comp in orig.components.items():  # nothing else changed, in any component
        if not isinstance(comp, torch.nn.Module):
            continue
        p_pat = dict(getattr(pat, name).named_parameters())
        for pname, p in comp.named_parameters():
            if (name, pname) in edited:
                continue
            assert torch.equal(p.detach().float(), p_pat[pname].detach().float()), (
                f"{name}.{pname} changed"
            )
    with torch.no_grad():
        out = call_pipe(pat, call, out_type)
    frames = out.frames if hasattr(out, "frames") else out[0]
    assert torch.isfinite(torch.as_tensor(frames)).all()
    return delta


@pytest.mark.parametrize("case", E2E_CASES, ids=[f"{c[0]}-{c[2]}" for c in E2E_CASES])
def test_probe_apply_reload_generate(case, pipes5, tmp_path, guardrail_stand_in):
    builder, family, site, extra, out_type = case
    src, call = pipes5(builder)
    delta = _probe_apply_reload_generate(src, call, family, site, extra, out_type, tmp_path)
    keys = sorted(e.tensor_key for e in delta.entries)
    if builder == "wan_vace":  # the VACE blocks' cross-attention is edited with the main blocks'
        assert keys == sorted(
            f"{b}.{i}.attn2.to_{kv}.weight"
            for b in ("blocks", "vace_blocks")
            for i in (0, 1)
            for kv in "kv"
        )
    if builder == "wan_animate":  # the face adapters read face motion, not text: untouched
        assert keys == sorted(f"blocks.{i}.attn2.to_{kv}.weight" for i in (0, 1) for kv in "kv")
    if builder == "cosmos25":
        assert keys == ["crossattn_proj.0.weight"]
    if builder in ("latte", "allegro"):
        assert keys == ["caption_projection.linear_1.weight"]


def test_families_are_detected_from_their_keys(pipes5):
    """A single file has no model_index.json: the transformer's keys alone pick the family, and the
    most specific one wins where one family's detection keys include another's (Latte / Allegro,
    Cosmos 2.5 / Cosmos 2)."""
    from safetensors import safe_open

    from patcher.families.recipes import detect_family

    want = {
        "wan22_5b": "wan",
        "wan_vace": "wan",
        "skyreels_v2": "wan",
        "chronoedit": "wan",
        "cosmos2": "cosmos",
        "cosmos25": "cosmos25",
        "allegro": "allegro",
        "latte": "latte",
    }
    for builder, family in want.items():
        src, _ = pipes5(builder)
        (f,) = (src / "transformer").glob("*.safetensors")
        with safe_open(str(f), "pt") as fh:
            keys = set(fh.keys())
        assert detect_family(None, keys) == family, builder
        assert detect_family(None, {f"model.diffusion_model.{k}" for k in keys}) == family


def test_families_lists_the_new_families():
    out = json.loads(run_cli("families", "--json"))
    fams = {r["family"]: r for r in out}
    assert {"cosmos", "cosmos25", "allegro", "latte", "wan"} <= set(fams)
    assert fams["cosmos25"]["sites"]["crossattn_proj"]["mode"] == "text"
    for name in ("SkyReelsV2DiffusionForcingPipeline", "ChronoEditPipeline", "WanAnimatePipeline"):
        assert name in fams["wan"]["pipelines"]


# ------------------------------------------------------------------------------- layouts

# diffusers' own single-file converters (loaders/single_file_utils.py) as the oracle for the recipes'
# original-layout aliases, as tests/test_layouts.py does for Wan and HunyuanVideo: build each original
# tensor where our rules say it is stored, convert with diffusers, and the diffusers key must get it back.
# (family, layout, converter, diffusers keys -> shape, extra original keys the converter looks for)
ORACLE = [
    # VACE, SkyReels-V2, ChronoEdit and Wan 2.2 5B files are Wan's layout (diffusers maps them all with
    # convert_wan_transformer_to_diffusers); VACE adds its vace_blocks
    (
        "wan",
        "original",
        "convert_wan_transformer_to_diffusers",
        {
            "condition_embedder.text_embedder.linear_1.weight": (8, 6),
            "blocks.0.attn2.to_k.weight": (8, 8),
            "blocks.1.attn2.to_v.weight": (8, 8),
            "vace_blocks.0.attn2.to_k.weight": (8, 8),
            "vace_blocks.1.attn2.to_v.weight": (8, 8),
            "vace_blocks.1.attn2.to_q.weight": (8, 8),
        },
        {"vace_blocks.0.after_proj.bias": (8,)},
    ),
    (
        "cosmos",
        "original",
        "convert_cosmos_transformer_checkpoint_to_diffusers",
        {
            "transformer_blocks.0.attn2.to_k.weight": (8, 6),
            "transformer_blocks.0.attn2.to_v.weight": (8, 6),
            "transformer_blocks.11.attn2.to_q.weight": (8, 8),
        },
        {"net.pos_embedder.dim_spatial_range": (3,)},
    ),
    (
        "cosmos25",
        "original",
        "convert_cosmos_transformer_checkpoint_to_diffusers",
        {
            "transformer_blocks.2.attn2.to_k.weight": (8, 6),
            "transformer_blocks.2.attn2.to_v.weight": (8, 6),
            "crossattn_proj.0.weight": (6, 10),
        },
        {},
    ),
]


@pytest.mark.parametrize("case", ORACLE, ids=[f"{c[0]}-{c[1]}" for c in ORACLE])
def test_alias_rules_agree_with_diffusers_single_file_converters(case):
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from patcher.layouts import rules_for

    family, layout, fn, wanted, extra = case
    rules = rules_for(family)
    g = torch.Generator().manual_seed(0)
    original = {k: torch.randn(*s, generator=g) for k, s in extra.items()}
    expect = {}
    for key, shape in sorted(wanted.items()):
        cands = rules.candidates(key)
        renamed = [s for s, r, _how in cands if r is not None and r.layout == layout]
        # crossattn_proj keeps its name in the original file
        stored = renamed[0] if renamed else key
        if family.startswith("cosmos"):  # NVIDIA's files keep the net. wrapper
            stored = "net." + stored
            assert any(s == stored for s, _r, _how in cands), stored  # apply looks there too
        expect[key] = original[stored] = torch.randn(*shape, generator=g)
    converted = getattr(sfu, fn)(dict(original))
    for key, block in expect.items():
        assert key in converted, f"diffusers maps none of our stored keys to {key}"
        assert torch.equal(converted[key], block), key


def test_cosmos25_text_mode_needs_no_guardrail_package(pipes5):
    """Encoding prompts is not generation: without cosmos_guardrail installed, the pipeline's own
    constructor raises ImportError for its default guardrail, and the probe still encodes."""
    pytest.importorskip("diffusers")
    try:
        import cosmos_guardrail  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cosmos_guardrail is installed: the failing default cannot be provoked")
    from patcher.probe.capture import site_inputs

    src, _call = pipes5("cosmos25")
    got = site_inputs(src, "crossattn_proj", [PROMPT])
    ((x, _mask),) = got[sorted(got)[0]]
    assert x.shape[0] == 512 and torch.isfinite(x).all() and float(x.abs().max()) > 0
