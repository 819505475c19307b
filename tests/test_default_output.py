"""`vpatch apply MODEL DELTA` without -o: the design-card command writes next to the input under a
derived name, prints it, and a second run refuses."""

import hashlib
import json
import os

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from patcher.cli import main
from patcher.naming import derived_output
from patcher.vud.combine import merge_deltas

from .conftest import make_delta, model_tensors, save_pipeline, save_sharded


def run(*args, cwd=None):
    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(here)
    return r.exit_code, r.stdout, r.stderr


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_file_gets_the_derived_name_and_a_second_run_refuses(tmp_path, bf16_model):
    src, d, t, delta = bf16_model
    before = _sha(src)
    code, out, err = run("apply", src, d)
    assert code == 0, err
    want = tmp_path / "model.no-red.safetensors"
    assert out.strip().splitlines()[-1] == str(want)
    assert want.is_file() and _sha(src) == before
    edited = load_file(want)
    assert not torch.equal(edited["blocks.0.attn2.to_k.weight"], t["blocks.0.attn2.to_k.weight"])
    assert torch.equal(edited["proj_out.weight"], t["proj_out.weight"])
    first = _sha(want)
    code, out, err = run("apply", src, d)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    assert _sha(want) == first and _sha(src) == before


def test_folder_gets_a_sibling_folder(tmp_path):
    t = model_tensors(torch.float32)
    root = save_pipeline(tmp_path / "wan", t)
    d = tmp_path / "red.vud"
    make_delta(d, t)
    code, out, err = run("apply", root, d, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["output"] == str(tmp_path / "wan-no-red")
    assert (tmp_path / "wan-no-red" / "transformer" / "config.json").is_file()
    assert (tmp_path / "wan-no-red" / "model_index.json").is_file()
    code, out, err = run("apply", str(root) + "/", d)  # a trailing slash names the same folder
    assert code == 2 and "already exists" in err


def test_names_for_every_input_kind(tmp_path):
    t = model_tensors(torch.float32)
    d1 = make_delta(tmp_path / "red.vud", t)
    d2 = make_delta(
        tmp_path / "blue.vud", t, keys=("blocks.1.attn2.to_k.weight",), concept="Blue Sky"
    )
    both = merge_deltas([d1, d2])
    f = tmp_path / "transformer.fp16.safetensors"
    f.write_bytes(b"")
    assert derived_output(f, d1) == tmp_path / "transformer.fp16.no-red.safetensors"
    assert derived_output(f, both) == tmp_path / "transformer.fp16.no-red-no-blue-sky.safetensors"
    shard_dir = tmp_path / "tr"
    shard_dir.mkdir()
    idx = save_sharded(shard_dir, t, "diffusion_pytorch_model")
    assert derived_output(idx, d1) == tmp_path / "tr-no-red"
    here = tmp_path / "cwd"
    assert derived_output("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", d1, cwd=here) == (
        here / "Wan2.1-T2V-1.3B-Diffusers-no-red"
    )
    spec = "Comfy-Org/Wan_2.1_ComfyUI_repackaged:split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
    assert derived_output(spec, d1, cwd=here) == here / "wan2.1_t2v_1.3B_fp16.no-red.safetensors"
    assert (
        derived_output("owner/name:transformer", d1, cwd=here) == here / "name-transformer-no-red"
    )


def test_a_long_concept_name_still_gives_a_usable_name(tmp_path):
    """A 300-character concept name made the derived name exceed 255 bytes, and the error said
    'choose a shorter -o' when no -o was given."""
    t = model_tensors(torch.float32)
    long_a = make_delta(tmp_path / "a.vud", t, concept="x" * 300)
    long_b = make_delta(tmp_path / "b.vud", t, concept="x" * 299 + "y")
    f = tmp_path / "model.safetensors"
    save_file(t, f)
    na, nb = derived_output(f, long_a), derived_output(f, long_b)
    assert len(na.name.encode()) <= 255 and na.name.startswith("model.no-xxx")
    assert na != nb  # the hash keeps two long names apart
    code, out, err = run("apply", f, tmp_path / "a.vud")
    assert code == 0, err
    assert (tmp_path / na.name).is_file()


def test_sharded_input_without_o(tmp_path):
    t = model_tensors(torch.float32)
    folder = tmp_path / "transformer"
    folder.mkdir()
    idx = save_sharded(folder, t, "diffusion_pytorch_model")
    d = tmp_path / "red.vud"
    make_delta(d, t)
    code, out, err = run("apply", idx, d)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "transformer-no-red")
    assert (tmp_path / "transformer-no-red" / idx.name).is_file()
