"""Issue 14 regressions (push, convert, preview, rich markup, the delta hash): each test failed on
the main branch before its fix."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import patcher
from patcher.cli import main
from patcher.errors import DeltaError, IntegrityError, VpatchError
from patcher.vud.delta import read_delta

from .conftest import make_delta, model_tensors


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _rewrite(src, dst, **changes):
    meta = _meta(src)
    meta.update(changes)
    save_file(load_file(src), dst, metadata=meta)


# ------------------------------------------------------------------ point 10: the delta hash


@pytest.mark.parametrize(
    "field,edit",
    [
        ("vpatch.concept", lambda c: {**c, "name": "something-else"}),
        ("vpatch.method", lambda m: {**m, "name": "mean"}),
        ("vpatch.method", lambda m: {**m, "extra": 1}),
    ],
)
def test_concept_and_method_are_covered_by_the_hash(tmp_path, field, edit):
    make_delta(tmp_path / "d.vud", model_tensors())
    old = json.loads(_meta(tmp_path / "d.vud")[field])
    _rewrite(tmp_path / "d.vud", tmp_path / "t.vud", **{field: json.dumps(edit(old))})
    with pytest.raises(IntegrityError, match="hash does not match"):
        read_delta(tmp_path / "t.vud")


def _v1_hash(path) -> str:
    """The version-1 hash, computed here from the file: canonical layer map, then U, V bytes."""
    meta = _meta(path)
    lm = json.loads(meta["vpatch.layer_map"])
    h = hashlib.sha256(json.dumps(lm, sort_keys=True, separators=(",", ":")).encode())
    t = load_file(path)
    for rec in lm:
        for s in ("U", "V"):
            h.update(t[f"{rec['key']}::{s}"].numpy().tobytes())
    return h.hexdigest()


def test_version_1_deltas_are_read_with_their_old_hash(tmp_path):
    make_delta(tmp_path / "d.vud", model_tensors())
    assert _meta(tmp_path / "d.vud")["vpatch.format_version"] == "2"
    v1 = _v1_hash(tmp_path / "d.vud")
    _rewrite(
        tmp_path / "d.vud",
        tmp_path / "v1.vud",
        **{"vpatch.format_version": "1", "vpatch.delta_sha256": v1},
    )
    d = read_delta(tmp_path / "v1.vud")
    assert d.sha256 == v1 and d.format_version == 1
    assert read_delta(tmp_path / "d.vud").sha256 != v1  # v2 covers more than v1
    # a version-1 file's concept is not covered (that is what version 2 fixed) ...
    _rewrite(
        tmp_path / "v1.vud",
        tmp_path / "v1b.vud",
        **{"vpatch.concept": json.dumps({"name": "edited"})},
    )
    assert read_delta(tmp_path / "v1b.vud").sha256 == v1
    # ... and a version-2 hash is not accepted under a version-1 label
    _rewrite(tmp_path / "d.vud", tmp_path / "v1c.vud", **{"vpatch.format_version": "1"})
    with pytest.raises(IntegrityError):
        read_delta(tmp_path / "v1c.vud")
    # a checkpoint patched with the v1 delta still recognises it as applied
    t = model_tensors()
    save_file(t, tmp_path / "m.safetensors")
    patcher.apply_delta(tmp_path / "m.safetensors", tmp_path / "v1.vud", tmp_path / "o.safetensors")
    with pytest.raises(VpatchError, match="already contains"):
        patcher.apply_delta(
            tmp_path / "o.safetensors", tmp_path / "v1.vud", tmp_path / "o2.safetensors"
        )


@pytest.mark.parametrize(
    "change",
    [
        {"base_dtype": ["F32"]},  # unhashable: was a TypeError
        {"base_dtype": {"a": 1}},
        {"strength": 10**400},  # beyond float range: was an OverflowError
    ],
)
def test_layer_map_field_types_are_delta_errors(tmp_path, change):
    make_delta(tmp_path / "d.vud", model_tensors())
    lm = json.loads(_meta(tmp_path / "d.vud")["vpatch.layer_map"])
    lm[0].update(change)
    _rewrite(tmp_path / "d.vud", tmp_path / "t.vud", **{"vpatch.layer_map": json.dumps(lm)})
    with pytest.raises(DeltaError, match=r"layer_map\[0\]"):
        read_delta(tmp_path / "t.vud")
    code, _, err = invoke("inspect", tmp_path / "t.vud")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_lone_surrogate_in_delta_metadata_is_a_delta_error(tmp_path):
    make_delta(tmp_path / "d.vud", model_tensors())
    _rewrite(
        tmp_path / "d.vud",
        tmp_path / "t.vud",
        **{"vpatch.concept": '{"name": "\\ud800"}'},
    )
    with pytest.raises(DeltaError, match="surrogate"):
        read_delta(tmp_path / "t.vud")
