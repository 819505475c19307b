"""Several concepts in one delta: `vpatch merge`. The merged edit is the projection onto the
complement of the concepts' joint span (computed here independently, by QR), each concept's
direction is removed, disjoint entries are united, and applying a second delta on top of a patched
checkpoint is refused with the merge hint where it would not be that projection."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import patcher
from patcher.cli import main
from patcher.errors import AlreadyApplied, DeltaError
from patcher.vud.combine import merge_deltas
from patcher.vud.delta import Delta, projection_entry, read_delta, write_delta

from .conftest import K1, K, V, raw_sha

KEY = "blocks.0.attn2.to_k.weight"


def _dirs(n: int, m: int, seed: int, mix: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, m, generator=g, dtype=torch.float64)
    if mix is not None:  # make it overlap the other concept's directions
        B[:, 0] += 2.0 * mix[:, 0].double()
    Q, _ = torch.linalg.qr(B)
    return Q.float()


def _model(tmp_path, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = {
        K: torch.randn(40, 24, generator=g),
        V: torch.randn(40, 24, generator=g),
        K1: torch.randn(40, 24, generator=g),
        "proj_out.weight": torch.randn(8, 40, generator=g),
    }
    t = {k: v.to(dtype) for k, v in t.items()}
    p = tmp_path / "model.safetensors"
    save_file(t, p)
    return p, t


def _delta(path, t, keys, B, name, strength=1.0):
    ents = [
        projection_entry(f"transformer/{k}", t[k].float(), B, strength, raw_sha(t[k]), "F32")
        for k in keys
    ]
    d = Delta(ents, {"name": name}, {"name": "cpca", "family": "wan"})
    write_delta(path, d)
    return read_delta(path)


@pytest.fixture
def two(tmp_path):
    p, t = _model(tmp_path)
    Ba = _dirs(24, 2, 1)
    Bb = _dirs(24, 1, 2, mix=Ba)  # overlaps u_a: a chain of projections is not the joint one
    da = _delta(tmp_path / "a.vud", t, [K, V], Ba, "nudity")
    db = _delta(tmp_path / "b.vud", t, [K, K1], Bb, "gore")
    return p, t, Ba, Bb, da, db


def test_merged_edit_is_the_joint_projection(tmp_path, two):
    p, t, Ba, Bb, da, db = two
    assert abs(float(Ba[:, 0] @ Bb[:, 0])) > 0.3  # the directions really overlap
    code = CliRunner().invoke(
        main,
        ["merge", str(tmp_path / "a.vud"), str(tmp_path / "b.vud"), "-o", str(tmp_path / "ab.vud")],
    )
    assert code.exit_code == 0, code.stderr
    ab = read_delta(tmp_path / "ab.vud")
    assert sorted(e.key for e in ab.entries) == sorted(f"transformer/{k}" for k in (K, V, K1))
    shared = next(e for e in ab.entries if e.tensor_key == K)
    assert shared.kind == "project_input" and shared.rank == 3

    patcher.apply_delta(p, tmp_path / "ab.vud", tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    # independent reference: QR of [B_a | B_b], W − W Q Qᵀ in float64
    Q, _ = torch.linalg.qr(torch.cat([Ba, Bb], 1).double())
    W = t[K].double()
    joint = W - (W @ Q) @ Q.T
    assert torch.allclose(out[K].double(), joint, atol=1e-5)
    # each concept's directions are gone from the shared weight
    assert float((out[K].double() @ Ba.double()).abs().max()) < 1e-5
    assert float((out[K].double() @ Bb.double()).abs().max()) < 1e-5
    # entries edited by one concept only keep that concept's single projection
    Wv = t[V].double()
    assert torch.allclose(out[V].double(), Wv - (Wv @ Ba.double()) @ Ba.double().T, atol=1e-5)
    W1 = t[K1].double()
    assert torch.allclose(out[K1].double(), W1 - (W1 @ Bb.double()) @ Bb.double().T, atol=1e-5)
    assert torch.equal(out["proj_out.weight"], t["proj_out.weight"])
    # the chain of projections (b after a) would not have removed u_a
    chain = (W - (W @ Ba.double()) @ Ba.double().T) @ (
        torch.eye(24, dtype=torch.float64) - Bb.double() @ Bb.double().T
    )
    assert float((chain @ Ba.double()).abs().max()) > 1e-2


def test_stored_factors_match_the_base(two):
    _, t, *_rest, da, db = two
    ab = merge_deltas([da, db])
    for e in ab.entries:
        W = t[e.tensor_key].float()
        assert torch.allclose(e.U, -e.strength * (W @ e.V), atol=1e-4)


def test_inspect_lists_concepts_per_entry(tmp_path, two):
    *_, da, db = two
    write_delta(tmp_path / "ab.vud", merge_deltas([da, db]))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "ab.vud"), "--json"])
    info = json.loads(r.stdout)
    got = {L["key"].split("/", 1)[1]: L["concepts"] for L in info["layers"]}
    assert got == {K: ["nudity", "gore"], V: ["nudity"], K1: ["gore"]}
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "ab.vud")])
    assert "nudity, gore" in r.stdout


def test_second_delta_on_a_patched_checkpoint_is_refused_with_the_merge_hint(tmp_path, two):
    p, t, Ba, Bb, da, db = two
    patcher.apply_delta(p, da, tmp_path / "a-applied.safetensors")
    r = CliRunner().invoke(
        main,
        [
            "apply",
            str(tmp_path / "a-applied.safetensors"),
            str(tmp_path / "b.vud"),
            "-o",
            str(tmp_path / "ab.safetensors"),
        ],
    )
    assert r.exit_code == 2 and "vpatch merge" in r.stderr and K in r.stderr
    assert not (tmp_path / "ab.safetensors").exists()
    with pytest.raises(AlreadyApplied, match="merge"):
        patcher.apply_delta(tmp_path / "a-applied.safetensors", db, tmp_path / "x.safetensors")
    # --force stacks anyway (the user's choice)
    patcher.apply_delta(
        tmp_path / "a-applied.safetensors", db, tmp_path / "forced.safetensors", force=True
    )


def test_second_delta_on_other_weights_stacks_correctly(tmp_path):
    p, t = _model(tmp_path)
    da = _delta(tmp_path / "a.vud", t, [K], _dirs(24, 1, 1), "nudity")
    db = _delta(tmp_path / "b.vud", t, [K1], _dirs(24, 1, 2), "gore")
    patcher.apply_delta(p, da, tmp_path / "a.safetensors")
    patcher.apply_delta(tmp_path / "a.safetensors", db, tmp_path / "ab-stacked.safetensors")
    patcher.apply_delta(p, merge_deltas([da, db]), tmp_path / "ab-merged.safetensors")
    s, m = (
        load_file(tmp_path / "ab-stacked.safetensors"),
        load_file(tmp_path / "ab-merged.safetensors"),
    )
    assert all(torch.equal(s[k], m[k]) for k in m)


def test_merge_refusals(tmp_path, two):
    p, t, Ba, Bb, da, db = two
    with pytest.raises(DeltaError, match="same"):
        merge_deltas([da, da])
    dc = _delta(tmp_path / "c.vud", t, [K], Bb, "violence", strength=0.5)
    with pytest.raises(DeltaError, match="different strengths"):
        merge_deltas([da, dc])
    r = CliRunner().invoke(
        main,
        [
            "merge",
            str(tmp_path / "a.vud"),
            str(tmp_path / "b.vud"),
            "-o",
            str(tmp_path / "a.vud"),
            "--overwrite",
        ],
    )
    assert r.exit_code == 2 and "one of the inputs" in r.stderr
