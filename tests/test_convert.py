"""`vpatch convert`: pickle in, safetensors out, only with --trust-pickle and weights_only loading."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors import safe_open

from patcher.cli import main
from patcher.safetensors_io import read_header


class NotATensor:  # any non-allowlisted object must be refused by weights_only loading
    pass


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_convert_needs_trust_and_keeps_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(5, generator=g),
        "c.half": torch.randn(2, 2, generator=g).half(),
    }
    sd["view.weight"] = sd["b.bias"][1:3]  # a view sharing storage
    torch.save({"state_dict": sd, "epoch": 7, "optimizer_name": "adam"}, tmp_path / "m.ckpt")

    res = invoke("convert", tmp_path / "m.ckpt", "-o", tmp_path / "m.safetensors")
    assert (
        res.exit_code == 2
        and "--trust-pickle" in res.output
        and not (tmp_path / "m.safetensors").exists()
    )

    res = invoke(
        "convert", tmp_path / "m.ckpt", "-o", tmp_path / "m.safetensors", "--trust-pickle", "--json"
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["tensors"] == 4
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd)
        for k, v in sd.items():
            t = f.get_tensor(k)
            assert t.dtype == v.dtype and torch.equal(t, v)
    meta = read_header(tmp_path / "m.safetensors").metadata
    assert meta["vpatch.converted_from"] == "m.ckpt" and len(meta["vpatch.source_sha256"]) == 64

    # the converted file is now accepted where the pickle was refused
    res = invoke("inspect", tmp_path / "m.safetensors")
    assert res.exit_code == 0 and "4 tensors" in res.output


def test_arbitrary_objects_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": NotATensor()}, tmp_path / "x.pt")
    res = invoke("convert", tmp_path / "x.pt", "-o", tmp_path / "x.safetensors", "--trust-pickle")
    assert res.exit_code == 2 and "weights_only" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.safetensors").exists()


def test_pickle_refusal_points_at_convert(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.bin")
    res = invoke("inspect", tmp_path / "model.bin")
    assert res.exit_code == 2 and "vpatch convert" in res.output and "--trust-pickle" in res.output
