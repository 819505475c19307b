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

from diffusers import DiffusionPipeline  # noqa: E402

from patcher.cli import main  # noqa: E402
from patcher.erasure.refusal import edit_weight  # noqa: E402
from patcher.probe.sites import find_module as _find_module  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402
from tests import tiny_pipes  # noqa: E402

warnings.filterwarnings("ignore")

HUNYUAN_TEMPLATE = [
    'encoders.text.template_from=""',
    'encoders.text.template="{}"',
    "encoders.text.crop_start=0",
]
COG_DENOISE = [
    "denoise.steps=2",
    "denoise.call.max_sequence_length=16",
    "denoise.call.num_frames=8",
    "denoise.call.height=16",
    "denoise.call.width=16",
]


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
            cache[key] = builder(
                root
                / key.replace("{", "")
                .replace("}", "")
                .replace('"', "")
                .replace(":", "_")
                .replace(" ", ""),
                **kw,
            )
        return cache[key]

    return get


def run_cli(*args: str) -> dict | str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (
        f"vpatch {' '.join(map(str, args))} failed ({res.exit_code}):\n{res.output}\n{res.exception!r}"
    )
    return res.stdout


def load(folder: Path):
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_of(pipe, key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    comp, tkey = key.split("/", 1)
    mod = _find_module(
        getattr(pipe, comp), tkey.removeprefix("text_model.").removesuffix(".weight")
    )
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
    (
        "cogvideox-joint_kv-denoise",
        "cogvideox",
        "cogvideox",
        "joint_kv",
        [a for s in COG_DENOISE for a in ("--set", s)],
    ),
    ("ltx-caption_proj", "ltx", "ltx", "caption_proj", []),
    ("ltx-cross_kv", "ltx", "ltx", "cross_kv", []),
    (
        "hunyuan-context_proj",
        "hunyuan",
        "hunyuan",
        "context_proj",
        [a for s in HUNYUAN_TEMPLATE for a in ("--set", s)],
    ),
    ("hunyuan-clip_pooled", "hunyuan", "hunyuan", "clip_pooled", []),
    ("mochi-bf16-caption_proj", "mochi", "mochi", "caption_proj", []),
    ("animatediff-cross_kv", "animatediff", "animatediff", "cross_kv", []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_probe_apply_reload_generate(case, pipes, tmp_path):
    _id, builder, family, site, extra = case
    src, call = pipes(builder)
    vud = tmp_path / "c.vud"
    out = run_cli(
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
        *extra,
    )
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
        expected_stored = expected.to(
            torch.bfloat16 if e.base_dtype == "BF16" else torch.float32
        ).float()
        tol = 1e-2 if e.base_dtype == "BF16" else 1e-5
        assert torch.allclose(W1, expected_stored, atol=tol * float(W0.abs().max()), rtol=0), e.key
        assert float((W1 - W0).abs().max()) > 0, f"{e.key} was not edited"
        if e.base_dtype != "BF16":
            assert float((W1 @ e.V).abs().max()) < 1e-4 * float(W0.abs().max()), "W'u = 0 at λ = 1"
        x = torch.randn(3, W0.shape[1], generator=torch.Generator().manual_seed(0))
        ref = torch.nn.functional.linear(
            x, expected_stored, None if mod_o.bias is None else mod_o.bias.detach().float()
        )
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
            assert torch.equal(p.detach().float(), p_pat[pname].detach().float()), (
                f"{name}.{pname} changed"
            )

    # the patched pipeline still generates
    kw = dict(call)
    if builder == "hunyuan":
        kw["prompt_template"] = {"template": "{}", "crop_start": 0}
    frames = pat(
        prompt="a woman standing on a beach",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).frames
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
    # the fingerprints the probe recorded are the ones apply computes on the same tensors
    from patcher.inspection import inspect_resolution

    info = inspect_resolution(src, vud)
    assert info["verdict"] == "compatible" and all(
        r["fingerprint"] == "base" for r in info["entries"]
    )


def test_i2v_image_conditioning_site(pipes, tmp_path):
    from PIL import Image

    src, call = pipes("wan_i2v")
    colours = {
        "red": (220, 20, 20),
        "white": (240, 240, 240),
        "blue": (20, 20, 220),
        "green": (20, 200, 20),
        "grey": (128, 128, 128),
    }
    for name, rgb in colours.items():
        img = Image.new("RGB", (32, 32), rgb)
        for i in range(0, 32, 4):  # some texture, so the pairs differ in more than a constant
            img.putpixel((i, i), (0, 0, 0))
        img.save(tmp_path / f"{name}.png")
    pairs = "\n".join(
        f'  {{ unsafe = "a ball {i}", safe = "a plain ball {i}", unsafe_image = "red.png", safe_image = "white.png" }},'
        for i in range(5)
    )
    (tmp_path / "red.toml").write_text(
        f'name = "red-image"\npairs = [\n{pairs}\n]\nneutral = ["a box", "a tree"]\n'
        'neutral_images = ["blue.png", "green.png", "grey.png"]\n'
    )
    vud = tmp_path / "img.vud"
    out = json.loads(
        run_cli(
            "probe",
            src,
            "-c",
            tmp_path / "red.toml",
            "-o",
            vud,
            "--layers",
            "image_kv",
            "--rank",
            "2",
            "--json",
        )
    )
    assert {g["site"] for g in out["groups"]} == {"image_kv"}
    delta = read_delta(vud)
    assert sorted(e.tensor_key for e in delta.entries) == [
        f"blocks.{i}.attn2.add_{kv}_proj.weight" for i in (0, 1) for kv in "kv"
    ]
    patched = tmp_path / "patched"
    run_cli("apply", src, vud, "-o", patched, "-q")
    orig, pat = load(src), load(patched)
    for e in delta.entries:
        _m, W0 = weight_of(orig, e.key)
        _m, W1 = weight_of(pat, e.key)
        assert torch.allclose(W1, edit_weight(W0, e.V, 1.0), atol=1e-5)
    frames = pat(
        image=Image.open(tmp_path / "red.png"),
        prompt="a ball",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **call,
    ).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()


def test_trap_sites_only_touch_text_readers(pipes, tmp_path):
    """attn2 is self-attention in UNet3D temporal blocks and in AnimateDiff motion modules: never edited."""
    for builder in ("zeroscope", "animatediff"):
        src, _ = pipes(builder)
        vud = tmp_path / f"{builder}.vud"
        run_cli("probe", src, "-c", "gore", "-o", vud, "--rank", "2", "-q")
        keys = [e.tensor_key for e in read_delta(vud).entries]
        assert keys and all(".attentions." in k and ".attn2.to_" in k for k in keys)
        assert not any(
            s in k for k in keys for s in ("temp_attentions", "transformer_in", "motion_modules")
        )
        unet = load(src).unet
        every_text_kv = [
            n + ".weight"
            for n, m in unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))
            and m.weight.shape[1] == unet.config.cross_attention_dim
            and ".attentions." in n
        ]
        assert sorted(keys) == sorted(every_text_kv)


REF_CASES = [
    ("wan", "text_proj", [], {}),
    ("wan", "cross_kv", [], {}),
    ("zeroscope", "cross_kv", [], {}),
    ("animatediff", "cross_kv", [], {}),
    ("cogvideox", "text_proj", ["encoders.text.max_length=16"], {}),
    (
        "ltx",
        "caption_proj",
        ["encoders.text.max_length=16"],
        {},
    ),  # T5 runs unmasked there: same padding length
    ("ltx", "cross_kv", ["encoders.text.max_length=16"], {}),
    (
        "hunyuan",
        "context_proj",
        HUNYUAN_TEMPLATE,
        {"prompt_template": {"template": "{}", "crop_start": 0}},
    ),
    ("hunyuan", "clip_pooled", [], {"prompt_template": {"template": "{}", "crop_start": 0}}),
    ("mochi", "caption_proj", [], {}),
    ("zeroscope", "clip_mlp", [], {}),  # hooked inside the text encoder
    ("wan", "t5_ffn", [], {}),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[f"{c[0]}-{c[1]}" for c in REF_CASES])
def test_capture_matches_the_pipelines_own_forward(case, pipes):
    """What the probe computes as a site's input (encoder + chain, no denoiser) equals what the real
    module receives inside the diffusers pipeline, seen by a forward pre-hook."""
    from patcher.families.recipes import load_family
    from patcher.probe.capture import site_inputs
    from patcher.probe.sites import site_targets
    from patcher.probe.sources import open_source

    builder, site, overrides, extra = case
    src, call = pipes(builder)
    prompt = "a naked man walking"  # shorter than the tiny pipelines' 16-token limit, so nothing is truncated
    got = site_inputs(src, site, [prompt], overrides=overrides)
    assert len(got) >= 1
    ((x, mask),) = got[sorted(got)[0]]  # the group of the first target (one group per hooked layer)
    fam = load_family(builder, overrides)
    t = site_targets(fam.sites[site], open_source(src), None, fam.key_prefixes)[0]
    pipe = load(src)
    seen: list[torch.Tensor] = []
    mod = _find_module(getattr(pipe, t.component), t.module)
    h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().float()))
    try:
        pipe(
            prompt=prompt,
            num_inference_steps=2,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **{**call, **extra},
        )
    finally:
        h.remove()
    ref = seen[0][0] if seen[0].dim() == 3 else seen[0]
    n = int(mask.sum()) if mask is not None else min(ref.shape[0], x.shape[0])
    assert (0 < n < 16 or (mask is None and n == x.shape[0] == ref.shape[0])) and ref.shape[
        -1
    ] == x.shape[-1]
    assert torch.allclose(x[:n], ref[:n], atol=1e-5 * float(ref.abs().max()) + 1e-6), float(
        (x[:n] - ref[:n]).abs().max()
    )


def test_image_capture_matches_the_pipelines_own_forward(pipes, tmp_path):
    from PIL import Image

    from patcher.probe.capture import site_inputs

    src, call = pipes("wan_i2v")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "i.png")
    ((x, mask),) = next(iter(site_inputs(src, "image_kv", [tmp_path / "i.png"]).values()))
    pipe = load(src)
    seen: list[torch.Tensor] = []
    h = pipe.transformer.blocks[0].attn2.add_k_proj.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().float())
    )
    try:
        # Wan's attention takes the last 512 context tokens as text (hard-coded), so the text must be 512 long
        pipe(
            image=Image.open(tmp_path / "i.png"),
            prompt="a ball",
            num_inference_steps=1,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **{**call, "max_sequence_length": 512},
        )
    finally:
        h.remove()
    assert mask is None and seen[0][0].shape == x.shape
    assert torch.allclose(x, seen[0][0], atol=1e-5)


def test_text_mode_never_builds_the_denoiser(pipes, tmp_path, monkeypatch):
    import diffusers

    wan, _ = pipes("wan")
    cog, _ = pipes("cogvideox")

    def tripwire(*_a, **_k):
        raise AssertionError("a diffusers model or pipeline was built")

    monkeypatch.setattr(diffusers.ModelMixin, "__init__", tripwire)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", tripwire)
    for site in ("text_proj", "cross_kv", "t5_ffn"):
        run_cli(
            "probe",
            wan,
            "-c",
            "nudity",
            "-o",
            tmp_path / f"{site}.vud",
            "--layers",
            site,
            "--rank",
            "2",
            "-q",
        )
    # the tripwire is live: a denoise-mode site must build the pipeline, and trips it
    res = CliRunner().invoke(
        main,
        [
            "probe",
            str(cog),
            "-c",
            "nudity",
            "-o",
            str(tmp_path / "j.vud"),
            "--layers",
            "joint_kv",
            "-q",
            *[a for s in COG_DENOISE for a in ("--set", s)],
        ],
    )
    assert isinstance(res.exception, AssertionError) and "was built" in str(res.exception)


def _as_transformers4_layout(folder: Path) -> None:
    """Rewrite a CLIP text encoder's file the way transformers 4.x saves it (``text_model.`` prefix)."""
    from safetensors.torch import load_file, save_file

    f = folder / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    save_file(
        {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()},
        str(f),
        metadata={"format": "pt"},
    )


def test_clip_text_encoder_sites_in_both_key_layouts(pipes, tmp_path):
    import shutil

    src5, call = pipes("zeroscope")
    src4 = tmp_path / "zs4"
    shutil.copytree(src5, src4)
    _as_transformers4_layout(src4)
    from safetensors import safe_open

    with safe_open(str(src4 / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())

    d5, d4 = tmp_path / "d5.vud", tmp_path / "d4.vud"
    run_cli(
        "probe",
        src5,
        "-c",
        "nudity",
        "-o",
        d5,
        "--layers",
        "clip_mlp,cross_kv",
        "--rank",
        "3",
        "-q",
    )
    run_cli(
        "probe",
        src4,
        "-c",
        "nudity",
        "-o",
        d4,
        "--layers",
        "clip_mlp,cross_kv",
        "--rank",
        "3",
        "-q",
    )
    e5 = {e.key: e for e in read_delta(d5).entries}
    e4 = {e.key: e for e in read_delta(d4).entries}
    enc5 = sorted(k for k in e5 if k.startswith("text_encoder/"))
    enc4 = sorted(k for k in e4 if k.startswith("text_encoder/"))
    assert enc5 == [
        "text_encoder/encoder.layers.0.mlp.fc2.weight",
        "text_encoder/encoder.layers.1.mlp.fc2.weight",
    ]
    assert enc4 == [
        k.replace("text_encoder/", "text_encoder/text_model.") for k in enc5
    ]  # keys as stored on disk
    for k5, k4 in zip(enc5, enc4):  # same weights, same activations, same edit
        assert torch.allclose(e5[k5].V, e4[k4].V, atol=1e-5) and torch.allclose(
            e5[k5].U, e4[k4].U, atol=1e-5
        )
    for k in e5:
        if k.startswith("unet/"):
            assert torch.allclose(e5[k].V, e4[k].V, atol=1e-5)

    out4 = tmp_path / "zs4-safe"
    run_cli("apply", src4, d4, "-o", out4, "-q")
    orig, pat = load(src4), load(out4)  # transformers 5.x strips the prefix on load
    for k in enc4:
        e = e4[k]
        _m, W0 = weight_of(orig, k)
        _m, W1 = weight_of(pat, k)
        assert torch.allclose(W1, edit_weight(W0, e.V, 1.0), atol=1e-5) and not torch.equal(W0, W1)
    frames = pat(
        prompt="a woman",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **call,
    ).frames
    assert torch.isfinite(torch.as_tensor(frames)).all()


def test_probe_user_errors_are_one_line(pipes, tmp_path):
    wan, _ = pipes("wan")
    i2v, _ = pipes("wan_i2v")
    cases = [
        (["probe", wan, "-c", "nudity", "--family", "ltx"], "matches no weight"),
        (
            ["probe", wan, "-c", "nudity", "--layers", "nosuch"],
            "has sites cross_kv, image_kv, t5_ffn, text_proj",
        ),
        (["probe", i2v, "-c", "nudity", "--layers", "image_kv"], "has no unsafe_image/safe_image"),
        (
            [
                "probe",
                wan,
                "-c",
                "nudity",
                "--layer-filter",
                "blocks\\.(9)\\.",
                "--layers",
                "cross_kv",
            ],
            "exclude everything",
        ),
        (["probe", wan, "-c", "nudity", "--device", "tpu"], "--device 'tpu'"),
        (["probe", tmp_path / "missing", "-c", "nudity"], "no such file or folder"),
        (["probe", wan, "-c", "nudity", "--encoder", "nosuch=/x"], "has encoders"),
    ]
    for args, msg in cases:
        out = tmp_path / "x.vud"
        res = CliRunner().invoke(main, [str(a) for a in args] + ["-o", str(out)])
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.startswith("vpatch:")]
        assert len(lines) == 1 and msg in lines[0], (msg, res.output)
        assert "Traceback" not in res.output and not out.exists()


def test_method_variants_and_multiple_directions(pipes, tmp_path):
    wan, _ = pipes("wan")
    V = {}
    for method in ("mean", "pca", "cpca"):
        rep = json.loads(
            run_cli(
                "probe",
                wan,
                "-c",
                "violence",
                "-o",
                tmp_path / f"{method}.vud",
                "--method",
                method,
                "--rank",
                "3",
                "--json",
            )
        )
        d = read_delta(tmp_path / f"{method}.vud")
        assert d.method["name"] == method
        V[method] = d.entries[0].V[:, 0]
        if method == "mean":
            assert rep["groups"][0]["kept"] == 1.0
        else:
            assert 0 < rep["groups"][0]["kept"] < 1.0  # a rank-3 subspace keeps part of r
    assert not torch.allclose(V["mean"], V["pca"], atol=1e-3) and not torch.allclose(
        V["pca"], V["cpca"], atol=1e-3
    )
    run_cli(
        "probe",
        wan,
        "-c",
        "violence",
        "-o",
        tmp_path / "m2.vud",
        "--rank",
        "4",
        "--directions",
        "2",
        "-q",
    )
    e = read_delta(tmp_path / "m2.vud").entries[0]
    assert e.rank == 2 and torch.allclose(e.V.T @ e.V, torch.eye(2), atol=1e-5)


def test_offload_needs_a_gpu(pipes, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cog, _ = pipes("cogvideox")
    res = CliRunner().invoke(
        main,
        [
            "probe",
            str(cog),
            "-c",
            "nudity",
            "-o",
            str(tmp_path / "j.vud"),
            "--layers",
            "joint_kv",
            "--offload",
            "model",
            *[a for s in COG_DENOISE for a in ("--set", s)],
        ],
    )
    assert (
        res.exit_code == 2
        and "--offload model needs a GPU" in res.output
        and not (tmp_path / "j.vud").exists()
    )


def test_probe_by_hub_id_from_the_local_cache(pipes, tmp_path, monkeypatch):
    """The real snapshot_download path, pointed (offline) at a hub-cache layout holding a tiny Wan."""
    import shutil

    import huggingface_hub.constants as hc

    wan, _ = pipes("wan")
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vpatch-test--tiny-wan"
    shutil.copytree(wan, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    rep = json.loads(
        run_cli(
            "probe",
            "vpatch-test/tiny-wan",
            "-c",
            "nudity",
            "-o",
            tmp_path / "h.vud",
            "--rank",
            "2",
            "--json",
        )
    )
    assert rep["family"] == "wan" and (tmp_path / "h.vud").is_file()
    res = CliRunner().invoke(
        main, ["probe", "vpatch-test/not-cached", "-c", "nudity", "-o", str(tmp_path / "n.vud")]
    )
    assert res.exit_code == 2 and "not in the local hub cache" in res.output


def test_existing_output_is_refused_before_any_work_unless_overwrite(pipes, tmp_path, monkeypatch):
    import patcher.probe.sources as P

    wan, _ = pipes("wan")
    out = tmp_path / "x.vud"
    out.write_bytes(b"keep me")

    def tripwire(*_a, **_k):
        raise AssertionError("a model was loaded before the output check")

    monkeypatch.setattr(P, "open_source", tripwire)
    res = CliRunner().invoke(main, ["probe", str(wan), "-c", "nudity", "-o", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output and out.read_bytes() == b"keep me"
    monkeypatch.undo()
    run_cli("probe", wan, "-c", "nudity", "-o", out, "--rank", "2", "--overwrite", "-q")
    assert read_delta(out).concept["name"] == "nudity"
