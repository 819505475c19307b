"""The map_input delta kind (format version 2): an input-side operator W' = W (I + λ P Qᵀ) that apply
recomputes from the target's own W, and revert undoes, on the base and on a fine-tune."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import patcher
from patcher.erasure.refusal import orthonormalize
from patcher.errors import DeltaError, RevertError
from patcher.vud.delta import Delta, map_input_entry, read_delta, write_delta

from .conftest import K, V, model_tensors, raw_sha


def _operator(in_dim=24, r=3, seed=4, singular=False):
    g = torch.Generator().manual_seed(seed)
    Q = orthonormalize(torch.randn(in_dim, r, generator=g))
    P = 0.5 * torch.randn(in_dim, r, generator=g)
    if singular:  # I + P Qᵀ sends Q[:, 0] to zero
        P[:, 0] = -Q[:, 0]
        P[:, 1:] = 0
    return P, Q


def _delta(path, t, P, Q, strength=1.0):
    entries = [
        map_input_entry(f"transformer/{k}", t[k].float(), P, Q, strength, raw_sha(t[k]), "F32")
        for k in (K, V)
    ]
    write_delta(path, Delta(entries, {"name": "red"}, {"name": "twin"}))


def test_map_input_round_trip_and_version(tmp_path):
    t = model_tensors(torch.float32)
    P, Q = _operator()
    _delta(tmp_path / "d.vud", t, P, Q)
    d = read_delta(tmp_path / "d.vud")
    e = d.entries[0]
    assert e.kind == "map_input" and torch.equal(e.P, P) and torch.equal(e.V, Q)
    assert torch.allclose(e.U, t[K] @ P)
    with safe_open(tmp_path / "d.vud", "pt") as f:
        assert f.metadata()["vpatch.format_version"] == "2"
    # P is covered by the hash: changing it is caught
    raw = load_file(tmp_path / "d.vud")
    with safe_open(tmp_path / "d.vud", "pt") as f:
        meta = dict(f.metadata())
    raw[f"transformer/{K}::P"] = raw[f"transformer/{K}::P"] * 1.01
    save_file(raw, tmp_path / "bad.vud", metadata=meta)
    with pytest.raises(patcher.errors.IntegrityError):
        read_delta(tmp_path / "bad.vud")
    # a version-1 file cannot hold map_input entries
    meta["vpatch.format_version"] = "1"
    raw = load_file(tmp_path / "d.vud")
    save_file(raw, tmp_path / "v1.vud", metadata=meta)
    with pytest.raises(DeltaError, match="version 2"):
        read_delta(tmp_path / "v1.vud")
    # a P factor on another kind is refused
    layer_map = json.loads(meta["vpatch.layer_map"])
    layer_map[0]["kind"] = "add"
    meta["vpatch.layer_map"] = json.dumps(layer_map)
    meta["vpatch.format_version"] = "2"
    save_file(raw, tmp_path / "k.vud", metadata=meta)
    with pytest.raises(DeltaError):
        read_delta(tmp_path / "k.vud")


def test_apply_recomputes_from_a_fine_tune_and_reverts(tmp_path):
    t = model_tensors(torch.float32)
    P, Q = _operator()
    _delta(tmp_path / "d.vud", t, P, Q)
    M = torch.eye(24) + P @ Q.T
    # the base: W M
    save_file(t, tmp_path / "base.safetensors")
    patcher.apply_delta(
        tmp_path / "base.safetensors", tmp_path / "d.vud", tmp_path / "a.safetensors"
    )
    out = load_file(tmp_path / "a.safetensors")
    for k in (K, V):
        assert torch.allclose(out[k], t[k] @ M, atol=1e-5)
    # a fine-tune: its own W times M (recomputed), not the base's factors added
    ft = {k: v.clone() for k, v in t.items()}
    ft[K] = ft[K] + 0.02 * torch.randn(ft[K].shape, generator=torch.Generator().manual_seed(9))
    save_file(ft, tmp_path / "ft.safetensors")
    patcher.apply_delta(tmp_path / "ft.safetensors", tmp_path / "d.vud", tmp_path / "b.safetensors")
    out = load_file(tmp_path / "b.safetensors")
    assert torch.allclose(out[K], ft[K] @ M, atol=1e-5)
    assert not torch.allclose(out[K], ft[K] + t[K] @ P @ Q.T, atol=1e-4)
    # factor mode adds the base's U Vᵀ as it is
    patcher.apply_delta(
        tmp_path / "ft.safetensors",
        tmp_path / "d.vud",
        tmp_path / "c.safetensors",
        use_factors=True,
    )
    assert torch.allclose(
        load_file(tmp_path / "c.safetensors")[K], ft[K] + t[K] @ P @ Q.T, atol=1e-5
    )
    # revert on the fine-tune inverts the map (Woodbury) without a record
    patcher.revert_delta(
        tmp_path / "b.safetensors",
        tmp_path / "d.vud",
        tmp_path / "r.safetensors",
        allow_inexact=True,  # fp32 rounding: bit-exact reverts need the revert record
    )
    back = load_file(tmp_path / "r.safetensors")
    assert torch.allclose(back[K], ft[K], atol=1e-5) and torch.allclose(back[V], ft[V], atol=1e-5)


def test_revert_refuses_a_singular_map_on_a_fine_tune(tmp_path):
    t = model_tensors(torch.float32)
    P, Q = _operator(singular=True)
    _delta(tmp_path / "d.vud", t, P, Q)
    ft = {k: v.clone() for k, v in t.items()}
    ft[K] = ft[K] * 1.01
    save_file(ft, tmp_path / "ft.safetensors")
    patcher.apply_delta(tmp_path / "ft.safetensors", tmp_path / "d.vud", tmp_path / "b.safetensors")
    with pytest.raises(RevertError, match="cannot be undone"):
        patcher.revert_delta(
            tmp_path / "b.safetensors", tmp_path / "d.vud", tmp_path / "r.safetensors"
        )


def test_map_input_may_hold_more_input_directions_than_the_weight_has_rows(tmp_path):
    """A map of the input space (in, r) with r above the row count: written, read, applied as
    W (I + λ P Qᵀ); an additive entry of that rank stays refused."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 12, generator=g)
    Q = orthonormalize(torch.randn(12, 7, generator=g))  # 7 directions, 4 rows
    P = 0.3 * torch.randn(12, 7, generator=g)
    e = map_input_entry("transformer/x.weight", W, P, Q, 1.0, None, "F32")
    write_delta(tmp_path / "m.vud", Delta([e], {"name": "c"}, {"name": "twin"}))
    back = read_delta(tmp_path / "m.vud").entries[0]
    assert back.rank == 7 and torch.equal(back.V, Q) and torch.equal(back.P, P)
    want = W @ (torch.eye(12) + P @ Q.T)  # written out here, not by the code under test
    assert torch.allclose(W + back.U @ back.V.T, want, atol=1e-5)

    add = patcher.vud.delta.DeltaEntry(
        "transformer/x.weight", (4, 12), "add", 1.0, torch.randn(4, 7), torch.randn(12, 7)
    )
    with pytest.raises(DeltaError, match=r"\[1, 4\]"):
        write_delta(tmp_path / "a.vud", Delta([add], {"name": "c"}, {"name": "mean"}))
