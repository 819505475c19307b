"""Two twin edits (map_input) in one delta: `vpatch merge` composes them in the order given, so the
merged delta is what applying the two deltas one after the other makes, W M_a M_b."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import patcher
from patcher.cli import main
from patcher.erasure.refusal import orthonormalize
from patcher.errors import DeltaError
from patcher.vud.combine import merge_deltas
from patcher.vud.delta import Delta, DeltaEntry, map_input_entry, projection_entry, write_delta

from .conftest import K, V, model_tensors, raw_sha


def _op(seed: int, r: int, in_dim: int = 24):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(in_dim, r, generator=g), orthonormalize(
        torch.randn(in_dim, r, generator=g)
    )


def _twin(path, t, P, Q, name, strength=1.0):
    entries = [
        map_input_entry(f"transformer/{k}", t[k].float(), P, Q, strength, raw_sha(t[k]), "F32")
        for k in (K, V)
    ]
    write_delta(path, Delta(entries, {"name": name}, {"name": "twin", "family": "wan"}))
    return path


def test_merged_twin_edits_are_the_product_of_their_maps(tmp_path):
    t = model_tensors(torch.float32)
    (Pa, Qa), (Pb, Qb) = _op(1, 3), _op(2, 4)
    Ma = torch.eye(24, dtype=torch.float64) + 0.8 * Pa.double() @ Qa.double().T
    Mb = torch.eye(24, dtype=torch.float64) + Pb.double() @ Qb.double().T
    da = _twin(tmp_path / "a.vud", t, Pa, Qa, "red", strength=0.8)
    db = _twin(tmp_path / "b.vud", t, Pb, Qb, "blue")
    r = CliRunner().invoke(
        main, ["merge", str(da), str(db), "-o", str(tmp_path / "ab.vud"), "--json"]
    )
    assert r.exit_code == 0, r.output
    m = patcher.vud.delta.read_delta(tmp_path / "ab.vud")
    assert [e.kind for e in m.entries] == ["map_input", "map_input"]
    for e in m.entries:
        W = t[e.tensor_key].double()
        M = torch.eye(24, dtype=torch.float64) + e.strength * e.P.double() @ e.V.double().T
        assert torch.allclose(M, Ma @ Mb, atol=1e-5)  # a first, then b
        assert not torch.allclose(M, Mb @ Ma, atol=1e-3)  # the order matters and is kept
        assert e.rank <= 7 and torch.allclose(
            e.V.double().T @ e.V.double(), torch.eye(e.rank, dtype=torch.float64), atol=1e-5
        )
        assert torch.allclose(e.U.double(), e.strength * W @ e.P.double(), atol=1e-4)
    # through apply: the merged delta == a, then b on top (--force: b edits the same weights)
    save_file(t, tmp_path / "base.safetensors")
    patcher.apply_delta(tmp_path / "base.safetensors", da, tmp_path / "a.safetensors")
    patcher.apply_delta(
        tmp_path / "a.safetensors", db, tmp_path / "a-then-b.safetensors", force=True
    )
    patcher.apply_delta(
        tmp_path / "base.safetensors", tmp_path / "ab.vud", tmp_path / "merged.safetensors"
    )
    chained, merged = (
        load_file(tmp_path / "a-then-b.safetensors"),
        load_file(tmp_path / "merged.safetensors"),
    )
    for k in (K, V):
        assert torch.allclose(merged[k], chained[k], atol=1e-5)
        assert torch.allclose(merged[k].double(), t[k].double() @ Ma @ Mb, atol=1e-5)


def test_a_projection_composes_with_a_twin_edit_and_an_additive_edit_does_not():
    t = model_tensors(torch.float32)
    Pa, Qa = _op(3, 2)
    B = orthonormalize(torch.randn(24, 1, generator=torch.Generator().manual_seed(5)))
    W = t[K].float()
    a = Delta(
        [map_input_entry(f"transformer/{K}", W, Pa, Qa, 1.0, raw_sha(t[K]), "F32")],
        {"name": "red"},
        {"name": "twin"},
    )
    b = Delta(
        [projection_entry(f"transformer/{K}", W, B, 1.2, raw_sha(t[K]), "F32")],
        {"name": "blue"},
        {"name": "cpca"},
    )
    (e,) = merge_deltas([a, b]).entries
    eye = torch.eye(24, dtype=torch.float64)
    want = (eye + Pa.double() @ Qa.double().T) @ (eye - 1.2 * B.double() @ B.double().T)
    assert torch.allclose(eye + e.P.double() @ e.V.double().T, want, atol=1e-5)
    add = Delta(
        [DeltaEntry(f"transformer/{K}", tuple(W.shape), "add", 1.0, W[:, :1], B)],
        {"name": "gore"},
        {"name": "add"},
    )
    with pytest.raises(DeltaError, match="additive"):
        merge_deltas([a, add])
