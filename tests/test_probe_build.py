"""One capture, many deltas: Activations save/load, build_delta against a direct probe, ProbeParams checks.

Runs on the shipped organism (a tiny Wan pipeline, no building needed): a capture takes a second.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from patcher.cli import main  # noqa: E402
from patcher.errors import ActivationsError, ProbeError  # noqa: E402
from patcher.probe import (  # noqa: E402
    CaptureOptions,
    ProbeParams,
    WeightReader,
    build,
    build_delta,
    capture,
    probe,
    read_activations,
    write_activations,
)
from patcher.probe.activations import (  # noqa: E402
    Activations,
    Capture,
    CaptureRecord,
    GroupActivations,
    TargetWeight,
)
from patcher.safetensors_io import read_header  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "organism" / "model"
RED = ROOT / "examples" / "organism" / "red.toml"
SITES = ("text_proj", "t5_ffn")  # one site behind a chain, one hooked inside the encoder (masked)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A direct probe that also saves its activations: (delta path, activations path, params)."""
    d = tmp_path_factory.mktemp("acts")
    params = ProbeParams(method="cpca", rank=4, alpha=0.5, strength=1.2)
    rep = probe(
        MODEL,
        RED,
        d / "direct.vud",
        CaptureOptions(sites=SITES, device="cpu"),
        params,
        save_activations=d / "red.safetensors",
    )
    return d / "direct.vud", d / "red.safetensors", params, rep


def same_activations(a: Activations, b: Activations) -> None:
    assert (a.family, a.defaults, a.sites, a.concept, a.capture, a.versions) == (
        b.family,
        b.defaults,
        b.sites,
        b.concept,
        b.capture,
        b.versions,
    )
    assert len(a.groups) == len(b.groups)
    for ga, gb in zip(a.groups, b.groups):
        assert (ga.site, ga.input, ga.targets) == (gb.site, gb.input, gb.targets)
        assert list(ga.roles) == list(gb.roles)
        for role in ga.roles:
            assert len(ga.roles[role]) == len(gb.roles[role])
            for pa, pb in zip(ga.roles[role], gb.roles[role]):
                assert len(pa) == len(pb)
                for ca, cb in zip(pa, pb):
                    assert ca.tokens.dtype == cb.tokens.dtype == torch.float32
                    assert torch.equal(ca.tokens, cb.tokens)
                    assert torch.equal(ca.positions, cb.positions)


def test_saved_activations_round_trip_exactly(captured, tmp_path):
    _vud, path, _params, _rep = captured
    weights = WeightReader.for_activations(read_activations(path))
    fresh = capture(MODEL, RED, CaptureOptions(sites=SITES, device="cpu"), weights)
    loaded = read_activations(path)
    same_activations(fresh, loaded)
    assert loaded.path == path and loaded.concept["name"] == "red"
    assert loaded.capture.model == str(MODEL) and loaded.capture.device == "cpu"
    # the t5_ffn groups are hooked inside the encoder: padding dropped, positions kept
    g = next(g for g in loaded.groups if g.site == "t5_ffn")
    c = g.roles["unsafe"][0][0]
    assert c.positions.tolist() == list(range(c.tokens.shape[0])) and 1 < c.tokens.shape[0] < 16
    assert {r: len(p) for r, p in g.roles.items()} == {"unsafe": 5, "safe": 5, "neutral": 8}
    # the targets' fingerprints are the stored bytes' sha256
    t = loaded.groups[0].targets[0]
    assert weights.read(t.component, t.key).sha256 == t.sha256
    # saving the reloaded value again gives the same file
    write_activations(tmp_path / "again.safetensors", loaded)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_build_from_saved_activations_equals_the_direct_probe(captured):
    vud, path, params, rep = captured
    direct = read_delta(vud)
    built = build_delta(read_activations(path), params)  # base weights reopened from the record
    assert [e.key for e in built.entries] == [e.key for e in direct.entries]
    assert len(direct.entries) == 1 + 2  # text_proj.linear_1, two t5_ffn layers
    for a, b in zip(built.entries, direct.entries):
        assert (a.kind, a.shape, a.strength, a.base_sha256, a.base_dtype) == (
            b.kind,
            b.shape,
            b.strength,
            b.base_sha256,
            b.base_dtype,
        )
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert built.sha256 == direct.sha256 == rep.delta_sha256
    assert built.method == direct.method
    assert built.concept == direct.concept


def test_other_params_from_one_capture_equal_a_direct_probe_with_them(captured, tmp_path):
    _vud, path, _params, _rep = captured
    acts = read_activations(path)
    weights = WeightReader.for_activations(acts)
    for p in (ProbeParams(method="pca", rank=2, directions=2, pooling="mean", strength=0.8),):
        out = tmp_path / f"{p.method}.vud"
        probe(MODEL, RED, out, CaptureOptions(sites=SITES, device="cpu"), p)
        direct = read_delta(out)
        b = build(acts, p, weights)
        assert b.delta.sha256 == direct.sha256
        assert all(
            torch.equal(x.U, y.U) and torch.equal(x.V, y.V)
            for x, y in zip(b.delta.entries, direct.entries)
        )
        assert b.delta.method["name"] == p.method and b.delta.method["pooling"] == (
            p.pooling or "tokens"
        )


def test_weight_reader_reads_each_weight_once(captured, monkeypatch):
    import patcher.probe.sources as S

    _vud, path, params, _rep = captured
    acts = read_activations(path)
    weights = WeightReader.for_activations(acts)
    calls = []
    real = S.TensorReader.raw
    monkeypatch.setattr(S.TensorReader, "raw", lambda self, k: calls.append(k) or real(self, k))
    first = build_delta(acts, params, weights)
    second = build_delta(acts, ProbeParams(strength=0.5), weights)
    n_targets = sum(len(g.targets) for g in acts.groups)
    assert len(calls) == n_targets == len(set(calls))
    assert not torch.equal(first.entries[0].U, second.entries[0].U)


def test_build_refuses_other_weights_than_captured(captured, tmp_path):
    _vud, path, _params, _rep = captured
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    t = read_activations(path).groups[0].targets[0]
    f = next((model / t.component).glob("*.safetensors"))
    sd = load_file(str(f))
    key = t.key
    sd[key] = sd[key] * 1.01
    save_file(sd, str(f), metadata={"format": "pt"})
    res = CliRunner().invoke(
        main, ["build", str(path), "-o", str(tmp_path / "x.vud"), "--model", str(model)]
    )
    assert res.exit_code == 2 and not (tmp_path / "x.vud").exists()
    lines = [ln for ln in res.output.splitlines() if ln.startswith("vpatch:")]
    assert len(lines) == 1 and "differs from the one the activations were captured" in lines[0]


def _one_line_error(args: list[str]) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_damaged_activations_give_one_named_error(captured, tmp_path):
    _vud, path, _params, _rep = captured
    blob = path.read_bytes()
    hdr = read_header(path)

    flipped = tmp_path / "flipped.safetensors"
    b = bytearray(blob)
    b[hdr.data_start + 7] ^= 0x01
    flipped.write_bytes(bytes(b))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[:-5])

    tensors = load_file(str(path))
    doc = json.loads(hdr.metadata["vpatch.activations"])
    doc["concept"]["name"] = "blue"
    relabelled = tmp_path / "relabelled.safetensors"
    save_file(tensors, str(relabelled), {**hdr.metadata, "vpatch.activations": json.dumps(doc)})
    del doc["capture"]
    missing = tmp_path / "missing-field.safetensors"
    save_file(tensors, str(missing), {**hdr.metadata, "vpatch.activations": json.dumps(doc)})

    cases = [
        (flipped, "modified or damaged"),
        (truncated, "truncated"),
        (relabelled, "modified or damaged"),
        (missing, "field 'capture' is missing"),
        (_vud_of(captured), "not vpatch activations"),
        (tmp_path / "acts.pt", "never loads pickle"),
    ]
    (tmp_path / "acts.pt").write_bytes(b"\x80\x04.")
    for p, msg in cases:
        with pytest.raises(ActivationsError, match=msg) as e:
            read_activations(p)
        assert "\n" not in str(e.value)
        line = _one_line_error(["build", p, "-o", tmp_path / "x.vud"])
        assert line.startswith("vpatch: ActivationsError:") and msg in line
        assert not (tmp_path / "x.vud").exists()


def _vud_of(captured) -> Path:
    return captured[0]


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"rank": 0}, "--rank 0"),
        ({"rank": -3}, "--rank -3"),
        ({"rank": True}, "--rank True"),
        ({"directions": 0}, "--directions 0"),
        ({"strength": -1.0}, "must be > 0"),
        ({"strength": 0.0}, "must be > 0"),
        ({"strength": math.nan}, "finite"),
        ({"alpha": -0.5}, "must be >= 0"),
        ({"method": "svd"}, "choose one of cpca, pca, mean"),
        ({"pooling": "max"}, "choose one of tokens, mean, last"),
    ],
)
def test_params_are_checked_once_with_one_line_errors(kw, msg):
    with pytest.raises(ProbeError, match=msg) as e:
        ProbeParams(**kw)
    assert "\n" not in str(e.value)


def test_params_fill_from_the_family_defaults():
    d = {"method": "cpca", "rank": 100, "alpha": 1.0, "strength": 1.0, "directions": 1}
    p = ProbeParams(rank=8, strength=1.5).resolved({**d, "pooling": "tokens"})
    assert p == ProbeParams("cpca", 8, 1.0, 1.5, 1, "tokens")
    with pytest.raises(ProbeError, match="pooling"):
        ProbeParams().resolved(d)
    with pytest.raises(ProbeError, match="--strength -2"):
        ProbeParams().resolved({**d, "pooling": "tokens", "strength": -2.0})


def test_cli_refuses_bad_params_before_loading_anything(tmp_path):
    # the model does not exist: the parameter error must come first
    for flag, val, msg in (
        ("--rank", "0", "--rank 0"),
        ("--strength", "-1", "must be > 0"),
        ("--method", "svd", "choose one of"),
        ("--offload", "disk", "--offload 'disk'"),
    ):
        line = _one_line_error(
            ["probe", tmp_path / "nope", "-c", "nudity", "-o", tmp_path / "x.vud", flag, val]
        )
        assert line.startswith("vpatch: ProbeError:") and msg in line
    line = _one_line_error(["probe", tmp_path / "nope", "-c", "nudity"])
    assert "nothing to write" in line


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_delta_and_activations_at_one_path_are_refused_before_any_work(tmp_path, overwrite):
    """-o X --save-activations X wrote the activations to X, then refused the delta (exit 2) and
    left a file that is not a delta at X; with --overwrite too."""
    x = tmp_path / "p1.vud"
    line = _one_line_error(
        ["probe", str(MODEL), "-c", str(RED), "-o", x, "--save-activations", x, *overwrite]
    )
    assert "both" in line and "different paths" in line
    assert not x.exists()
    y = tmp_path / "sub" / ".." / "p1.vud"  # the same path spelled another way
    (tmp_path / "sub").mkdir()
    line = _one_line_error(["probe", str(MODEL), "-c", str(RED), "-o", x, "--save-activations", y])
    assert "different paths" in line and not x.exists()
    link = tmp_path / "link"
    link.symlink_to(tmp_path)  # the same folder through a link
    line = _one_line_error(
        ["probe", str(MODEL), "-c", str(RED), "-o", x, "--save-activations", link / "p1.vud"]
    )
    assert "different paths" in line and not x.exists()


def test_cli_capture_once_then_build_many(tmp_path):
    acts = tmp_path / "red.safetensors"
    res = CliRunner().invoke(
        main,
        ["probe", str(MODEL), "-c", str(RED), "--save-activations", str(acts), "--json"],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["delta"] is None and rep["activations"] == str(acts)
    assert rep["groups"][0]["prompts"] == {"unsafe": 5, "safe": 5, "neutral": 8}
    shas = set()
    for i, strength in enumerate(("0.8", "1.5")):
        res = CliRunner().invoke(
            main,
            [
                "build",
                str(acts),
                "-o",
                str(tmp_path / f"{i}.vud"),
                "--strength",
                strength,
                "--json",
            ],
        )
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        d = read_delta(tmp_path / f"{i}.vud")
        assert out["delta_sha256"] == d.sha256 and d.method["strength"] == float(strength)
        assert out["activations"] == str(acts) and out["groups"][0]["site"] == "text_proj"
        shas.add(d.sha256)
    assert len(shas) == 2
    # an existing delta is never replaced without --overwrite
    line = _one_line_error(["build", acts, "-o", tmp_path / "0.vud"])
    assert "already exists" in line


def test_hand_made_activations_with_several_calls_and_extra_roles_round_trip(tmp_path):
    """Denoise-mode shape (several calls per prompt), an empty role and a role a future method adds."""
    g = torch.Generator().manual_seed(0)

    def prompt(calls: int, n: int) -> tuple[Capture, ...]:
        return tuple(
            Capture(torch.randn(n, 6, generator=g), torch.arange(n) * 2) for _ in range(calls)
        )

    t = TargetWeight(
        "transformer",
        "blocks.0.attn.to_k.weight",
        "transformer/blocks.0.attn.to_k.weight",
        (4, 6),
        "BF16",
        "ab" * 32,
    )
    grp = GroupActivations(
        "joint_kv",
        "transformer:blocks.0.attn:6",
        (t,),
        {
            "unsafe": (prompt(3, 2), prompt(3, 5)),
            "safe": (prompt(3, 2), prompt(3, 1)),
            "neutral": (),
            "preserve": (prompt(1, 0),),
        },
    )
    acts = Activations(
        "cogvideox",
        {"method": "cpca"},
        ("joint_kv",),
        {"name": "x"},
        CaptureRecord("/m", None, "cpu", "float32", 3, "blocks", ("denoise.steps=2",), 2),
        {"torch": torch.__version__},
        (grp,),
    )
    write_activations(tmp_path / "a.safetensors", acts)
    back = read_activations(tmp_path / "a.safetensors")
    same_activations(acts, back)
    assert back.groups[0].roles["preserve"][0][0].tokens.shape == (0, 6)
    with pytest.raises(
        ProbeError, match="a prompt has no valid tokens"
    ):  # before any weight is read
        build_delta(back, ProbeParams("mean", 1, 1.0, 1.0, 1, "mean"), weights=object())
