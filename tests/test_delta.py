import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from patcher.erasure.refusal import lowrank_norm, orthonormalize, projection_factors
from patcher.errors import DeltaError, IntegrityError, OutputError, VpatchError
from patcher.vud.delta import Delta, DeltaEntry, read_delta, write_delta

from .conftest import K, V, make_delta, model_tensors


def test_round_trip_keeps_everything(tmp_path):
    t = model_tensors()
    d = make_delta(tmp_path / "d.vud", t)
    r = read_delta(tmp_path / "d.vud")
    assert r.sha256 == d.sha256
    assert r.concept["name"] == "red" and r.method["name"] == "cpca"
    assert {"vpatch", "torch", "safetensors"} <= set(r.versions)
    for a, b in zip(d.entries, r.entries):
        assert (
            a.key == b.key
            and a.shape == b.shape
            and a.kind == b.kind
            and a.base_sha256 == b.base_sha256
        )
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    # the file is plain safetensors: fp32 factors named by key
    raw = load_file(tmp_path / "d.vud")
    assert raw[f"transformer/{K}::U"].dtype == torch.float32
    assert raw[f"transformer/{V}::V"].shape == (24, 1)


def test_projection_factors_are_the_closed_form():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 12, generator=g)
    B = orthonormalize(torch.randn(12, 2, generator=g))
    U, Vf = projection_factors(W, B, 1.0)
    W2 = W + U @ Vf.T
    assert torch.allclose(
        W2 @ B, torch.zeros(16, 2), atol=1e-5
    )  # the edited layer no longer reads span(B)
    x = torch.randn(12, generator=g)
    x_perp = x - B @ (B.T @ x)
    assert torch.allclose(
        W2 @ x_perp, W @ x_perp, atol=1e-5
    )  # inputs orthogonal to B pass unchanged
    assert lowrank_norm(U, Vf) == pytest.approx(float((U @ Vf.T).norm()), rel=1e-5)


def _rewrite_meta(src, dst, **changes):
    tensors = load_file(src)
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(tensors, dst, metadata=meta)


def test_tampered_strength_fails_the_hash(tmp_path):
    make_delta(tmp_path / "d.vud", model_tensors())
    lm = json.loads(read_delta_meta(tmp_path / "d.vud")["vpatch.layer_map"])
    lm[0]["strength"] = 5.0
    _rewrite_meta(tmp_path / "d.vud", tmp_path / "t.vud", **{"vpatch.layer_map": json.dumps(lm)})
    with pytest.raises(IntegrityError, match="hash does not match"):
        read_delta(tmp_path / "t.vud")


def test_tampered_factor_bytes_fail_the_hash(tmp_path):
    make_delta(tmp_path / "d.vud", model_tensors())
    raw = bytearray((tmp_path / "d.vud").read_bytes())
    raw[-3] ^= 0x01  # a mantissa bit of the last factor
    (tmp_path / "t.vud").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        read_delta(tmp_path / "t.vud")


def read_delta_meta(p):
    from patcher.safetensors_io import read_header

    return read_header(p).metadata


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("vpatch.format_version", "99", "upgrade vpatch"),
        ("vpatch.layer_map", "{not json", "not valid JSON"),
        (
            "vpatch.layer_map",
            json.dumps(
                [
                    {
                        "key": "no-component",
                        "shape": [40, 24],
                        "kind": "add",
                        "strength": 1,
                        "rank": 1,
                    }
                ]
            ),
            "component/state.dict.key",
        ),
        (
            "vpatch.layer_map",
            json.dumps(
                [
                    {
                        "key": f"transformer/{K}",
                        "shape": [40, 24],
                        "kind": "scale",
                        "strength": 1,
                        "rank": 1,
                    }
                ]
            ),
            "kind",
        ),
        ("vpatch.method", "[]", "JSON dict"),
    ],
)
def test_malformed_metadata_names_the_field(tmp_path, field, value, msg):
    make_delta(tmp_path / "d.vud", model_tensors())
    _rewrite_meta(tmp_path / "d.vud", tmp_path / "t.vud", **{field: value})
    with pytest.raises(DeltaError, match=msg):
        read_delta(tmp_path / "t.vud")


def test_factor_shape_disagreeing_with_map_is_rejected(tmp_path):
    make_delta(tmp_path / "d.vud", model_tensors())
    t = load_file(tmp_path / "d.vud")
    t[f"transformer/{K}::U"] = torch.zeros(39, 1)
    save_file(t, tmp_path / "t.vud", metadata=read_delta_meta(tmp_path / "d.vud"))
    with pytest.raises(DeltaError, match="layer map needs F32"):
        read_delta(tmp_path / "t.vud")


def test_checkpoint_given_as_delta_says_so(tmp_path):
    save_file(model_tensors(), tmp_path / "m.safetensors")
    with pytest.raises(DeltaError, match="swap CHECKPOINT and DELTA"):
        read_delta(tmp_path / "m.safetensors")


def test_writer_refuses_bad_entries_and_leaves_nothing(tmp_path):
    bad = DeltaEntry(
        f"transformer/{K}", (40, 24), "project_input", 1.0, torch.zeros(40, 1), torch.ones(24, 1)
    )  # V not unit
    with pytest.raises(DeltaError, match="orthonormal"):
        write_delta(tmp_path / "x.vud", Delta([bad]))
    nan = DeltaEntry(
        f"transformer/{K}",
        (40, 24),
        "add",
        1.0,
        torch.full((40, 1), float("nan")),
        torch.ones(24, 1),
    )
    with pytest.raises(DeltaError, match="NaN"):
        write_delta(tmp_path / "x.vud", Delta([nan]))
    assert list(tmp_path.iterdir()) == []


def test_writer_needs_existing_folder(tmp_path):
    t = model_tensors()
    with pytest.raises(OutputError, match="does not exist"):
        make_delta(tmp_path / "nope" / "d.vud", t)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_delta_bytes_only_raise_vpatch_errors(tmp_path, data):
    src = tmp_path / "d.vud"
    if not src.exists():
        make_delta(src, model_tensors())
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    p = tmp_path / "f.vud"
    p.write_bytes(bytes(raw))
    try:
        read_delta(p)
    except VpatchError:
        pass
