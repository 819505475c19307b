"""Issue 14 regressions (push, convert, preview, rich markup, the delta hash): each test failed on
the main branch before its fix."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
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


# ------------------------------------------------------------------ point 8 and convert tracebacks


def _convert(tmp_path, obj, name="m.pt"):
    src = tmp_path / name
    if isinstance(obj, bytes):
        src.write_bytes(obj)
    else:
        torch.save(obj, src)
    before = src.read_bytes()
    code, out, err = invoke("convert", src, "-o", tmp_path / "o.safetensors", "--trust-pickle")
    assert src.read_bytes() == before
    return code, out, err


@pytest.mark.parametrize(
    "obj,key",
    [
        ({"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}, "'a.b'"),
        ({"model": {"x.y": torch.zeros(2), "x": {"y": torch.ones(2)}}}, "'x.y'"),
        ({1: torch.zeros(2), "1": torch.ones(2)}, "'1'"),
    ],
)
def test_convert_refuses_colliding_flattened_keys(tmp_path, obj, key):
    code, _, err = _convert(tmp_path, obj)
    assert code == 2 and "same key" in err and key in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "vpatch-tmp" in p.name]


@pytest.mark.parametrize(
    "obj,words",
    [
        ({"\ud800": torch.zeros(2)}, "surrogate"),  # was a UnicodeEncodeError traceback
        ({"ok": {"\udcff": torch.zeros(2)}}, "surrogate"),
        ({"__metadata__": torch.zeros(2)}, "reserves"),  # was a ValueError traceback
        (b"", "empty"),  # was an IndexError traceback
        (b"PK\x03\x04" + b"\x00" * 60, "torch.load"),
        ({"w": torch.zeros(3).to_sparse()}, "dense"),
    ],
)
def test_convert_bad_inputs_are_one_line_exit_2(tmp_path, obj, words):
    code, _, err = _convert(tmp_path, obj)
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()


def test_convert_dtype_message_says_what_is_true(tmp_path):
    sd = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.bool)}
    code, _, err = _convert(tmp_path, sd)
    assert code == 2 and "torch.float64" in err and "torch.bool" in err
    assert "no safetensors equivalent" not in err
    assert "vpatch does not map them" in err and "F32" in err


def test_convert_keeps_a_non_utf8_source_name_escaped(tmp_path):
    name = os.fsdecode(b"m\xff.pt")  # a surrogate in the metadata value was a traceback
    code, _, err = _convert(tmp_path, {"w": torch.zeros(2)}, name=name)
    assert code == 0, err
    assert _meta(tmp_path / "o.safetensors")["vpatch.converted_from"] == "m\\xff.pt"
