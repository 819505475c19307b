"""The paper's Open-Sora 2.0 site end to end: probe txt_mlp (denoise mode on the converted single file)
-> delta under the original key names -> apply edits exactly those tensors of the single file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from patcher.cli import main  # noqa: E402
from patcher.erasure.refusal import edit_weight  # noqa: E402
from patcher.vud.delta import read_delta  # noqa: E402
from tests import tiny_pipes  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "data" / "opensora2_tiny.safetensors"
# the tiny model: head_dim 16, T5 width 24, CLIP pooled 12, 16 packed latent channels (4 x 2x2)
TINY = [
    "convert.config.axes_dims_rope=[4, 6, 6]",
    "encoders.text.max_length=16",
    "denoise.steps=2",
    "denoise.call.num_frames=5",
    "denoise.call.height=32",
    "denoise.call.width=48",
    "denoise.call.latent_channels=4",
]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    tiny_pipes.tiny_t5(24).save_pretrained(str(d / "t5"))
    tiny_pipes.t5_tokenizer(d / "t5tok").save_pretrained(str(d / "t5"))
    tiny_pipes.tiny_clip_text(12).save_pretrained(str(d / "clip"))
    tiny_pipes.clip_tokenizer(d / "cliptok").save_pretrained(str(d / "clip"))
    return d


def _probe(ck, out, encoders, *extra):
    args = ["probe", ck, "-c", "violence", "-o", out, "--rank", "4", "--json"]
    args += ["--encoder", f"text={encoders / 't5'}", "--encoder", f"pooled={encoders / 'clip'}"]
    args += [a for s in TINY for a in ("--set", s)] + list(extra)
    return CliRunner().invoke(main, [str(a) for a in args])


def test_txt_mlp_probe_and_apply_on_the_single_file(tmp_path, encoders):
    ck = tmp_path / "Open_Sora_v2.safetensors"
    shutil.copy(WEIGHTS, ck)
    res = _probe(ck, tmp_path / "v.vud", encoders)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["family"] == "opensora2" and rep["method"]["sites"] == ["txt_mlp"]
    delta = read_delta(tmp_path / "v.vud")
    # the default keeps the last two double blocks (17, 18 of the release's 19; here 1, 2 of 3),
    # named as the single file names them
    assert sorted(e.key for e in delta.entries) == [
        f"transformer/double_blocks.{n}.txt_mlp.0.weight" for n in (1, 2)
    ]
    assert all(e.base_dtype == "BF16" for e in delta.entries)
    # samples: 16 text positions (no mask) x 2 steps per prompt
    assert {g["samples"] for g in rep["groups"]} == {5 * 16 * 2}
    assert (
        len({tuple(e.V.flatten().tolist()) for e in delta.entries}) == 2
    )  # one direction per block

    out = tmp_path / "safe.safetensors"
    res = CliRunner().invoke(
        main, ["apply", str(ck), str(tmp_path / "v.vud"), "-o", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    edited = {e.tensor_key: e for e in delta.entries}
    with safe_open(str(ck), "pt") as a, safe_open(str(out), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            if k in edited:
                W0 = a.get_tensor(k).float()
                ref = edit_weight(W0, edited[k].V, 1.0)
                got = b.get_tensor(k).float()
                assert float((got - ref).abs().max()) <= 1e-2 * float(W0.abs().max())
                assert float((got @ edited[k].V).norm()) < 0.1 * float((W0 @ edited[k].V).norm())
            else:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_txt_mlp_blocks_are_selectable(tmp_path, encoders):
    ck = tmp_path / "Open_Sora_v2.safetensors"
    shutil.copy(WEIGHTS, ck)
    res = _probe(ck, tmp_path / "v.vud", encoders, "--layer-filter", r"double_blocks\.0\.")
    assert res.exit_code == 0, res.output
    keys = [e.key for e in read_delta(tmp_path / "v.vud").entries]
    assert keys == ["transformer/double_blocks.0.txt_mlp.0.weight"]


def test_txt_mlp_on_a_folder_is_refused(tmp_path, encoders):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "X"}')
    (tmp_path / "m" / "transformer").mkdir()
    shutil.copy(WEIGHTS, tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors")
    res = _probe(tmp_path / "m", tmp_path / "v.vud", encoders, "--family", "opensora2")
    assert res.exit_code == 2, res.output
    assert "single file" in res.output and "Traceback" not in res.output


def test_txt_mlp_activations_saved_then_built_equal_the_direct_probe(tmp_path, encoders):
    """The converted file's denoise capture is an Activations value like the pipeline's: per prompt,
    one capture per sampling step; a build from the saved file gives the probe's own delta."""
    from patcher.families.recipes import load_concept
    from patcher.probe import read_activations

    ck = tmp_path / "Open_Sora_v2.safetensors"
    shutil.copy(WEIGHTS, ck)
    acts = tmp_path / "v.acts.safetensors"
    res = _probe(ck, tmp_path / "v.vud", encoders, "--save-activations", acts)
    assert res.exit_code == 0, res.output
    saved = read_activations(acts)
    con = load_concept("violence")
    assert saved.capture.denoise_steps == 2
    assert sorted(g.targets[0].key for g in saved.groups) == [
        f"double_blocks.{n}.txt_mlp.0.weight" for n in (1, 2)
    ]
    for g in saved.groups:
        counts = {r: len(ps) for r, ps in g.roles.items()}
        assert counts == {
            "unsafe": len(con.pairs),
            "safe": len(con.pairs),
            "neutral": len(con.neutral),
        }
        assert {len(p) for ps in g.roles.values() for p in ps} == {2}  # one capture per step
        assert {tuple(c.tokens.shape) for ps in g.roles.values() for p in ps for c in p} == {
            (16, 32)
        }
    res = CliRunner().invoke(
        main, ["build", str(acts), "-o", str(tmp_path / "b.vud"), "--rank", "4", "--json"]
    )
    assert res.exit_code == 0, res.output
    direct, built = read_delta(tmp_path / "v.vud"), read_delta(tmp_path / "b.vud")
    assert [e.key for e in built.entries] == [e.key for e in direct.entries]
    for a, b in zip(built.entries, direct.entries):
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert built.sha256 == direct.sha256
