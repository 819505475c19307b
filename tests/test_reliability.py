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

from .conftest import make_delta, model_tensors, save_pipeline


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


# ------------------------------------------------------------------ point 7: push refuses by content


@pytest.fixture
def safe(tmp_path):
    t = model_tensors()
    src = save_pipeline(tmp_path / "base", t)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    make_delta(tmp_path / "d.vud", t, concept="nudity")
    patcher.apply_delta(
        src, tmp_path / "d.vud", tmp_path / "safe", revert_record=tmp_path / "rec.revert"
    )
    return tmp_path


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _push_refused(tmp, match):
    before = _tree(tmp / "safe")
    with pytest.raises(VpatchError, match=match):
        from patcher.push import push

        push(tmp / "safe", "me/x", dry_run=True)
    assert not (tmp / "safe.push-staged").exists()
    assert not [p for p in tmp.iterdir() if "vpatch-tmp" in p.name]
    assert _tree(tmp / "safe") == before
    code, _, err = invoke("push", tmp / "safe", "--repo-id", "me/x", "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "what,name",
    [
        ("d.vud", "notes.bin"),
        ("rec.revert", "priv.rec"),
        ("d.vud", "RED.VUD"),
        ("d.vud", "x.vud.bak"),
        ("rec.revert", "transformer/extra.safetensors"),
        ("d.vud", "docs/deep/readme"),
    ],
)
def test_push_refuses_renamed_deltas_and_records(safe, what, name):
    dst = safe / "safe" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes((safe / what).read_bytes())
    _push_refused(safe, "delta or a revert record")


def test_push_refuses_a_truncated_delta(safe):
    raw = (safe / "d.vud").read_bytes()
    (safe / "safe" / "part.dat").write_bytes(raw[: len(raw) // 2])  # header intact, data cut
    _push_refused(safe, "delta or a revert record")
    n = int.from_bytes(raw[:8], "little")
    (safe / "safe" / "part.dat").write_bytes(raw[: 8 + n // 2])  # header itself cut
    _push_refused(safe, "delta or a revert record")


def test_push_refuses_links_out_of_the_folder(safe):
    (safe / "secret.txt").write_text("not for upload")
    os.symlink(safe / "secret.txt", safe / "safe" / "notes.txt")
    _push_refused(safe, "outside")
    (safe / "safe" / "notes.txt").unlink()
    os.symlink(safe / "d.vud", safe / "safe" / "weights.dat")  # a link to the delta
    _push_refused(safe, "outside|delta")
    (safe / "safe" / "weights.dat").unlink()
    os.symlink(safe / "base" / "text_encoder", safe / "safe" / "te2")  # a link to a folder
    _push_refused(safe, "link to a folder")
    (safe / "safe" / "te2").unlink()
    os.symlink("missing", safe / "safe" / "dangling")  # inside, but nothing there
    _push_refused(safe, "cannot be read")


def test_push_stages_a_link_inside_the_folder_as_its_content_and_never_writes_the_input(safe):
    from patcher.push import push

    os.symlink("model_index.json", safe / "safe" / "index-copy.json")
    before = _tree(safe / "safe")
    r = push(safe / "safe", "me/x", dry_run=True)
    staged = safe / "safe.push-staged"
    assert "index-copy.json" in r.files and not (staged / "index-copy.json").is_symlink()
    assert (staged / "index-copy.json").read_bytes() == (
        safe / "safe" / "model_index.json"
    ).read_bytes()
    # the folder's own README (copied from the base by apply) is not overwritten by the card
    assert _tree(safe / "safe") == before
    assert (safe / "safe" / "README.md").read_text().endswith("# base\n")
    assert "## Limits" in (staged / "README.md").read_text()


# ------------------------------------------------------------------ push field types


@pytest.mark.parametrize(
    "report,field",
    [
        ([1, 2], "the report"),
        ({"presence": [1]}, "presence"),
        ({"presence": {"probe": 3}}, "presence.probe"),
        (
            {"presence": {"probe": {"before": {"rate": "1"}, "after": {}}}},
            "presence.probe.before.rate",
        ),
        (
            {"presence": {"probe": {"before": {"rate": 1, "ci95": [0, None]}, "after": {}}}},
            "presence.probe.before.ci95",
        ),
        ({"collateral": {"colour": {"before": None}}}, "collateral.colour.before"),
    ],
)
def test_push_eval_report_with_wrong_field_types_is_exit_2(safe, report, field):
    (safe / "eval.json").write_text(json.dumps(report))
    code, _, err = invoke(
        "push", safe / "safe", "--repo-id", "me/x", "--dry-run", "--eval-report", safe / "eval.json"
    )
    assert code == 2 and field in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (safe / "safe.push-staged").exists()


def test_push_delta_with_unexpected_field_types_still_writes_the_card(tmp_path):
    from patcher.vud.delta import Delta, write_delta

    t = model_tensors()
    src = save_pipeline(tmp_path / "base", t)
    d = make_delta(tmp_path / "d0.vud", t)
    odd = Delta(d.entries, {"name": "x", "pairs": 7}, {"name": ["a"], "sites": 5, "rank": {}})
    write_delta(tmp_path / "d.vud", odd)
    patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "safe")
    code, out, err = invoke(
        "push", tmp_path / "safe", "--repo-id", "me/x", "--dry-run", "--delta", tmp_path / "d.vud"
    )
    assert code == 0, err
    card = (tmp_path / "safe.push-staged" / "README.md").read_text()
    assert "edit sites: 5" in card and "refusal direction(s) from unsafe/safe" in card


# ------------------------------------------------------------------ point 9: the preview's sidecar


def _preview_inputs():
    from patcher.evaluation.core import Job

    jobs = [
        Job("probe", "a red ball", 0, True, None),
        Job("probe", "a red ball", 1, True, None),
        Job("free", "a tree", 0, False, None),
    ]
    clips = {"before": torch.zeros(3, 3, 2, 4, 4), "after": torch.ones(3, 3, 2, 4, 4) * 0.5}
    return jobs, clips


@pytest.mark.parametrize("existing", ["notes.txt", "notes.gif"])
def test_preview_never_overwrites_its_sidecar_or_itself(tmp_path, existing):
    from patcher.evaluation.core import write_preview

    (tmp_path / existing).write_text("mine")
    # eval has no -o and no --overwrite for it: the message named both
    with pytest.raises(VpatchError, match=r"already exists; choose another --preview$"):
        write_preview(tmp_path / "notes.gif", *_preview_inputs())
    assert (tmp_path / existing).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing else written


def test_preview_writes_both_files_when_free(tmp_path):
    from patcher.evaluation.core import write_preview

    write_preview(tmp_path / "notes.gif", *_preview_inputs())
    assert (tmp_path / "notes.gif").read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    assert "probe: a red ball" in (tmp_path / "notes.txt").read_text()
    with pytest.raises(VpatchError, match="name it .gif"):
        write_preview(tmp_path / "x.txt", *_preview_inputs())


def test_eval_refuses_an_existing_sidecar_before_sampling(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = invoke(
        "eval",
        "examples/organism/model",
        "-c",
        "examples/organism/red.toml",
        "--delta",
        tmp_path / "never-read.vud",
        "--preview",
        tmp_path / "notes.gif",
    )
    assert code == 2 and "notes.txt already exists" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "notes.gif").exists()


# ------------------------------------------------------------------ point 10: rich markup


def test_markup_in_a_concept_name_or_path_prints_as_itself(tmp_path):
    t = model_tensors()
    odd = tmp_path / "[" / "x]"  # every path below contains "[/x]"
    odd.mkdir(parents=True)
    src = save_pipeline(odd / "base", t)
    make_delta(odd / "d.vud", t, concept="[/x] [bold]red")
    code, out, err = invoke("apply", src, odd / "d.vud", "-o", odd / "safe")
    assert code == 0, err
    assert "[/x] [bold]red" in err and (odd / "safe" / "model_index.json").exists()
    code, out, err = invoke("push", odd / "safe", "--repo-id", "me/x", "--dry-run")
    assert code == 0, err
    assert "[/x]" in err
    code, out, err = invoke("inspect", odd / "d.vud")
    assert code == 0 and "[/x] [bold]red" in out


def test_push_refuses_a_fifo_without_opening_it(safe):
    import subprocess
    import sys

    os.mkfifo(safe / "safe" / "transformer" / "extra.safetensors")  # opening it would block
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "patcher.cli",
            "push",
            str(safe / "safe"),
            "--repo-id",
            "me/x",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not a regular file" in r.stderr


def test_an_index_nested_past_the_json_parser_depth_is_a_format_error(tmp_path):
    from patcher.checkpoint import load_index
    from patcher.errors import FormatError

    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text("[" * 100_000)
    with pytest.raises(FormatError):
        load_index(idx)
