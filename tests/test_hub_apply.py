"""Hub ids as apply/inspect inputs, through the real snapshot_download, served offline from a
hub-cache layout built in tmp_path (no hub is reachable here)."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from patcher import hub
from patcher.cli import main

from .conftest import K, V, make_delta, model_tensors, save_pipeline

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id, **kw):  # the real download, with what it was asked for noted
        calls.append((repo_id, kw.get("allow_patterns")))
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)

    def put(repo, folder):
        d = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, d / "snapshots" / REV)
        (d / "refs").mkdir()
        (d / "refs" / "main").write_text(REV)
        return d / "snapshots" / REV

    put.calls = calls
    return put


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


def test_apply_a_hub_pipeline_writes_a_complete_patched_pipeline(tmp_path, cache):
    t = model_tensors(torch.bfloat16)
    snap = cache("vpatch-test/tiny-pipe", save_pipeline(tmp_path / "src", t))
    make_delta(tmp_path / "d.vud", t)
    res = run(
        "apply", "vpatch-test/tiny-pipe", tmp_path / "d.vud", "-o", tmp_path / "out", "--json"
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["checkpoint"] == str(snap) and rep["coverage"]["matched"] == 2
    out = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(out[K], t[K]) and not torch.equal(out[V], t[V])
    for f in (
        "model_index.json",
        "README.md",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
    ):
        assert (tmp_path / "out" / f).read_bytes() == (snap / f).read_bytes(), f
    # the real snapshot_download was asked for safetensors and sidecars only
    assert cache.calls[-1][0] == "vpatch-test/tiny-pipe"
    assert cache.calls[-1][1] == hub.patterns_for(None)
    assert (
        snap / "transformer" / "diffusion_pytorch_model.safetensors"
    ).is_file()  # the cache is never written


def test_apply_one_file_or_component_of_a_hub_repo(tmp_path, cache):
    t = model_tensors(torch.float16)
    src = tmp_path / "src"
    (src / "split_files" / "diffusion_models").mkdir(parents=True)
    save_file(t, src / "split_files" / "diffusion_models" / "m_fp16.safetensors")
    save_pipeline(src / "pipe", t)
    cache("vpatch-test/repack", src)
    make_delta(tmp_path / "d.vud", t)
    res = run(
        "apply",
        "vpatch-test/repack:split_files/diffusion_models/m_fp16.safetensors",
        tmp_path / "d.vud",
        "-o",
        tmp_path / "o.safetensors",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert cache.calls[-1][1] == ["split_files/diffusion_models/m_fp16.safetensors"]
    assert not torch.equal(load_file(tmp_path / "o.safetensors")[K], t[K])
    res = run(
        "apply",
        "vpatch-test/repack:pipe/transformer",
        tmp_path / "d.vud",
        "-o",
        tmp_path / "comp",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["coverage"]["how"].startswith("inferred from keys")
    assert (tmp_path / "comp" / "diffusion_pytorch_model.safetensors").is_file() and (
        tmp_path / "comp" / "config.json"
    ).is_file()
    res = run(
        "inspect", "vpatch-test/repack:pipe/transformer", "--delta", tmp_path / "d.vud", "--json"
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["verdict"] == "compatible"


def test_hub_errors_are_one_line_user_errors(tmp_path, cache):
    t = model_tensors(torch.bfloat16)
    cache("vpatch-test/tiny-pipe", save_pipeline(tmp_path / "src", t))
    make_delta(tmp_path / "d.vud", t)
    res = run("apply", "vpatch-test/not-cached", tmp_path / "d.vud", "-o", tmp_path / "o")
    assert (
        res.exit_code == 2
        and "not in the local hub cache" in res.output
        and "Traceback" not in res.output
    )
    res = run(
        "apply",
        "vpatch-test/tiny-pipe:no/such.safetensors",
        tmp_path / "d.vud",
        "-o",
        tmp_path / "o.safetensors",
    )
    assert res.exit_code == 2 and "has no 'no/such.safetensors'" in res.output
    res = run("apply", "not a path or id", tmp_path / "d.vud", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "no such file or folder" in res.output
    assert not (tmp_path / "o").exists()


def test_patterns_fetch_weights_and_sidecars_but_never_pickles_or_other_formats():
    repo = [
        "model_index.json",
        "README.md",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer.json",
        "transformer/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "model.ckpt",
        "unet/model.onnx",
        "unet/flax_model.msgpack",
        "wan-Q4.gguf",
        "vae/model.pt",
        "assets/demo.mp4",
    ]
    got = set(filter_repo_objects(repo, allow_patterns=hub.patterns_for(None)))
    assert got == set(repo[:7])
    got = set(filter_repo_objects(repo, allow_patterns=hub.patterns_for("transformer")))
    assert got == {
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    }
    sharded = [
        "t/m.safetensors.index.json",
        "t/m-00001-of-00002.safetensors",
        "t/m-00002-of-00002.safetensors",
        "t/m.bin",
        "x.safetensors",
    ]
    assert set(
        filter_repo_objects(sharded, allow_patterns=hub.patterns_for("t/m.safetensors.index.json"))
    ) == set(sharded[:3])


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("owner/name", ("owner/name", None)),
        ("owner/name:sub/file.safetensors", ("owner/name", "sub/file.safetensors")),
        ("owner/name:transformer/", ("owner/name", "transformer")),
        ("just-a-name", None),
        ("a/b/c", None),
        ("../x", None),
        ("owner/na me", None),
    ],
)
def test_hub_id_parsing(spec, parsed):
    assert hub.parse(spec) == parsed
