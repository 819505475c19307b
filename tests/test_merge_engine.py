"""The merge engine's public values: planned edit ops (a second consumer, such as an adapter
export, works from them) and the frozen statistics the kernel returns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import patcher
from patcher.merge import EditOp, EditStats, plan_apply

from .conftest import K, V, add_delta, directions, make_delta, model_tensors


def test_plan_ops_locate_each_edit_with_factors_strength_and_fingerprint(tmp_path):
    t = model_tensors(torch.float32)
    save_file(t, tmp_path / "m.safetensors")
    d = make_delta(tmp_path / "d.vud", t, strength=0.8)
    plan = plan_apply(tmp_path / "m.safetensors", tmp_path / "d.vud", strength=0.5)
    ops = plan.ops()
    assert [op.key for op in ops] == [K, V]
    by_entry = {e.key: e for e in d.entries}
    for op in ops:
        assert isinstance(op, EditOp)
        e = by_entry[op.entry]
        assert op.file == tmp_path / "m.safetensors" and op.rows is None
        assert op.shape == tuple(t[op.key].shape) and op.dtype == "F32"
        assert op.recompute and op.strength == pytest.approx(0.8 * 0.5)
        assert torch.equal(op.V, e.V) and torch.equal(op.U, e.U)
        assert op.base_sha256 == e.base_sha256 and op.rank == 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            op.strength = 2.0  # type: ignore[misc]
    # a consumer that only reads the ops reproduces what apply writes: W - λ (W V) Vᵀ
    r = patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors", strength=0.5
    )
    out = load_file(tmp_path / "o.safetensors")
    for op in ops:
        W = t[op.key]
        assert torch.allclose(out[op.key], W - op.strength * (W @ op.V) @ op.V.T, atol=1e-6)
    assert all(isinstance(s, EditStats) for s in r.tensors)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.tensors[0].rounding_error = 0.0  # type: ignore[misc]


def test_plan_ops_with_factors_carry_the_user_strength(tmp_path):
    t = model_tensors(torch.float32)
    save_file(t, tmp_path / "m.safetensors")
    d = add_delta(tmp_path / "a.vud", tuple(t[K].shape))
    (op,) = plan_apply(tmp_path / "m.safetensors", tmp_path / "a.vud", strength=2.0).ops()
    assert op.kind == "add" and not op.recompute and op.strength == 2.0
    assert torch.equal(op.U, d.entries[0].U) and op.rank == 2
    make_delta(tmp_path / "d.vud", t)
    ops = plan_apply(tmp_path / "m.safetensors", tmp_path / "d.vud", use_factors=True).ops()
    assert all(not op.recompute and op.strength == 1.0 for op in ops)
    assert directions().shape[0] == ops[0].V.shape[0]
