"""--overwrite replaces only an earlier vpatch output of the same kind, recognised by its header."""

from __future__ import annotations

import hashlib

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from patcher.cli import main
from patcher.errors import OutputError
from patcher.vud.delta import write_delta
from tests.conftest import make_delta, model_tensors


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_delta_replaces_only_a_delta(tmp_path):
    t = model_tensors(torch.float32)
    d = make_delta(tmp_path / "d.vud", t)
    make_delta(tmp_path / "old.vud", t, concept="blue")
    write_delta(tmp_path / "old.vud", d, overwrite=True)  # an earlier delta: replaced
    save_file(t, tmp_path / "weights.safetensors")
    save_file(t, tmp_path / "rec.safetensors", metadata={"vpatch.format": "vud-revert"})
    (tmp_path / "model.pt").write_bytes(b"not really a pickle")
    for victim, why in [
        ("weights.safetensors", "did not write"),
        ("rec.safetensors", "revert record"),
        ("model.pt", "model weight file"),
    ]:
        before = _sha(tmp_path / victim)
        with pytest.raises(OutputError, match=why):
            write_delta(tmp_path / victim, d, overwrite=True)
        assert _sha(tmp_path / victim) == before


def test_probe_never_writes_over_the_model_it_reads_or_other_weights(tmp_path):
    from tests import tiny_pipes

    model, _ = tiny_pipes.wan(tmp_path / "wan")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    other = tmp_path / "elsewhere.safetensors"
    save_file(model_tensors(torch.float32), other)  # somebody's weights, not a delta
    before = {p: _sha(p) for p in (weights, other)}
    for out, why in [(weights, "inside the input folder"), (other, "did not write")]:
        res = CliRunner().invoke(
            main, ["probe", str(model), "-c", "nudity", "-o", str(out), "--overwrite"]
        )
        assert res.exit_code == 2 and why in res.output, res.output
        assert "Traceback" not in res.output
    assert {p: _sha(p) for p in before} == before
    # an earlier delta is what --overwrite is for
    res = CliRunner().invoke(
        main, ["probe", str(model), "-c", "nudity", "-o", str(tmp_path / "d.vud")]
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        main, ["probe", str(model), "-c", "nudity", "-o", str(tmp_path / "d.vud"), "--overwrite"]
    )
    assert res.exit_code == 0, res.output
