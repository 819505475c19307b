"""Issue 14, apply/revert/output: what apply never destroys, and a one-line exit 2 for every bad
input. Each test failed on the main branch before its fix."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import patcher
from patcher.cli import main
from patcher.errors import (
    FormatError,
    OutputError,
    RevertError,
    VpatchError,
)
from patcher.safetensors_io import read_header
from patcher.vud.delta import Delta, DeltaEntry, write_delta

from .conftest import UNTOUCHED, K, V, make_delta, model_tensors, save_pipeline

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def assert_one_line_exit_2(*args, match: str | None = None):
    code, _out, err = invoke(*args)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("vpatch: "), err
    assert "Traceback" not in err
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


def _module_with(*names):
    """The module of the merge package that holds one of ``names`` (so that these tests also run
    against the layout before the engine split, where they fail for the bug, not for an import)."""
    import importlib

    for mod in ("patcher.merge.writer", "patcher.merge.kernel", "patcher.merge.engine"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if any(hasattr(m, n) for n in names):
            return m
    raise AssertionError(names)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "vpatch-tmp" in p.name or "vpatch-old" in p.name]


def rewrite_header(src: Path, dst: Path, change) -> None:
    """Copy a safetensors file with its JSON header changed by ``change(dict)`` (data unchanged)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8 : 8 + n])
    change(hdr)
    text = json.dumps(hdr).encode()  # ensure_ascii: a lone surrogate stays the escape \ud800
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.fixture
def pipe(tmp_path):
    t = model_tensors(torch.bfloat16)
    root = save_pipeline(tmp_path / "pipe", t)
    make_delta(tmp_path / "d.vud", t)
    return root, tmp_path / "d.vud", t


# --------------------------------------------------------------------------- 1, 2: symlinks


def test_1_symlinked_component_folder_is_patched_and_copied(tmp_path, pipe):
    root, d, t = pipe
    (root / "_store").mkdir()
    (root / "transformer").rename(root / "_store" / "transformer")
    (root / "transformer").symlink_to(Path("_store") / "transformer")
    r = patcher.apply_delta(root, d, tmp_path / "out")
    out = tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert out.is_file() and not out.is_symlink()
    assert r.coverage["matched"] == 2 and {s.key for s in r.tensors} == {K, V}
    patched = load_file(out)
    assert not torch.equal(patched[K], t[K])
    assert all(torch.equal(patched[k], t[k]) for k in UNTOUCHED)
    assert "vpatch.applied" in read_header(out).metadata


def test_1_2_component_folder_linked_outside_the_input_is_refused(tmp_path, pipe):
    root, d, _ = pipe
    (root / "transformer").rename(tmp_path / "elsewhere")
    (root / "transformer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FormatError, match="outside the input"):
        patcher.apply_delta(root, d, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_2_file_linked_outside_the_input_is_never_read(tmp_path, pipe):
    root, d, _ = pipe
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (root / "text_encoder" / "notes.txt").symlink_to(secret)
    with pytest.raises(FormatError, match="outside the input"):
        patcher.apply_delta(root, d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_one_line_exit_2("apply", root, d, "-o", tmp_path / "out2", match="outside the input")


def test_2_links_within_the_input_and_hub_cache_blobs_are_followed(tmp_path, pipe):
    root, d, t = pipe
    repo = tmp_path / "hub" / "models--a--b"
    snap = repo / "snapshots" / "rev0"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir():
            (snap / rel).mkdir(parents=True, exist_ok=True)
        else:
            blob = blobs / f"b{len(list(blobs.iterdir()))}"
            blob.write_bytes(p.read_bytes())
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    (snap / "README-copy.md").symlink_to("README.md")  # a link within the input
    patcher.apply_delta(snap, d, tmp_path / "out")
    out = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(out[K], t[K])
    assert (tmp_path / "out" / "README-copy.md").read_text() == "# tiny\n"


# --------------------------------------------------------------------------- 3: --overwrite


def test_3_overwrite_never_replaces_the_delta_or_an_input(tmp_path, bf16_model):
    src, d, _, _ = bf16_model
    before_d, before_src = d.read_bytes(), src.read_bytes()
    with pytest.raises(OutputError):
        patcher.apply_delta(src, d, d, overwrite=True)
    with pytest.raises(OutputError):
        patcher.apply_delta(src, d, tmp_path / "o.safetensors", revert_record=src, overwrite=True)
    with pytest.raises(OutputError):
        patcher.apply_delta(src, d, tmp_path / "o.safetensors", revert_record=d, overwrite=True)
    # the message names the option that was given the path (it said "choose another -o")
    line = assert_one_line_exit_2(
        "apply", src, d, "-o", tmp_path / "o.safetensors", "--revert-record", d
    )
    assert "choose another --revert-record" in line and "-o" not in line.split("choose")[1]
    assert d.read_bytes() == before_d and src.read_bytes() == before_src
    assert not (tmp_path / "o.safetensors").exists()


def test_3_revert_record_equal_to_out_is_refused_before_any_work(tmp_path, bf16_model):
    src, d, _, _ = bf16_model
    o = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="revert-record"):
        patcher.apply_delta(src, d, o, revert_record=o)
    assert not o.exists() and leftovers(tmp_path) == []


def test_3_overwrite_replaces_only_a_previous_vpatch_output(tmp_path, pipe):
    root, d, _ = pipe
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="did not write"):
        patcher.apply_delta(root, d, mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    # weights that vpatch did not write are not replaced either
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, weights)
    t = model_tensors(torch.bfloat16)
    save_file(t, tmp_path / "m.safetensors")
    with pytest.raises(OutputError, match="did not write"):
        patcher.apply_delta(tmp_path / "m.safetensors", d, weights, overwrite=True)
    assert load_file(weights)["w"].sum() == 2
    # a previous vpatch output is replaced
    patcher.apply_delta(root, d, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("x")
    patcher.apply_delta(root, d, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert leftovers(tmp_path) == []


def test_3_pipeline_onto_an_existing_file_with_overwrite_is_one_line(tmp_path, pipe):
    root, d, _ = pipe
    f = tmp_path / "x.txt"
    f.write_text("keep")
    assert_one_line_exit_2("apply", root, d, "-o", f, "--overwrite", match="is a file")
    assert f.read_text() == "keep"


# --------------------------------------------------------------------------- 4: -o inside the input


def test_4_out_inside_the_input_folder_is_refused(tmp_path, pipe):
    root, d, _ = pipe
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(OutputError, match="inside the input"):
        patcher.apply_delta(root, d, root / "safe")
    with pytest.raises(OutputError, match="inside the input"):
        patcher.apply_delta(root, d, root / "transformer" / "safe")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_4_a_single_files_output_is_a_file_path_not_a_folder(tmp_path, bf16_model):
    """-o for one input file names the file to write: an existing folder was silently written into
    under the input's own name (a patched model named as the original; `-o /` wrote /model...)."""
    src, d, _, _ = bf16_model
    folder = tmp_path / "somedir"
    folder.mkdir()
    assert_one_line_exit_2("apply", src, d, "-o", folder, match="is one file")
    assert list(folder.iterdir()) == []
    # "newdir/" asks for a folder: it made a file named newdir
    assert_one_line_exit_2("apply", src, d, "-o", f"{tmp_path / 'newdir'}/", match="is one file")
    assert not os.path.lexists(tmp_path / "newdir")
    # revert likewise (it wrote the unpatched weights as somedir/model.no-red.safetensors)
    patched = tmp_path / "p.safetensors"
    patcher.apply_delta(src, d, patched)
    assert_one_line_exit_2("revert", patched, d, "-o", folder, match="is one file")
    assert list(folder.iterdir()) == []
    code, out, _ = invoke("apply", src, d, "-o", folder / "m.safetensors", "--json")
    assert code == 0 and json.loads(out)["output"] == str(folder / "m.safetensors")


def test_4_a_dry_run_refuses_what_the_run_would(tmp_path, pipe):
    """--dry-run checked no output: it exited 0 for an -o inside the input, an existing -o and a
    missing parent, where the real run exits 2."""
    root, d, _ = pipe
    exists = tmp_path / "exists"
    exists.mkdir()
    for o, msg in (
        (root / "sub", "inside the input"),
        (exists, "already exists"),
        (tmp_path / "nodir" / "x", "does not exist"),
    ):
        for extra in ([], ["--dry-run"]):
            assert_one_line_exit_2("apply", root, d, "-o", o, *extra, match=msg)
    # without -o the dry run names the folder the run would write
    code, out, _ = invoke("apply", root, d, "--dry-run", "--json")
    assert code == 0
    target = Path(json.loads(out)["output"])
    assert target.parent == root.parent and target.name.startswith(root.name + "-no-")
    assert not target.exists()


def test_pickle_files_get_the_pickle_refusal_with_the_conversion_hint(tmp_path, pipe):
    """A component holding only diffusion_pytorch_model.bin said 'no transformer/ weights ... is
    this delta for another model?', and import-lora on a torch.save file 'header length ...
    exceeds the limit'; both now say it is pickle and how to convert it."""
    root, d, _ = pipe
    (w,) = (root / "transformer").glob("*.safetensors")
    torch.save({"w": torch.ones(2)}, root / "transformer" / "diffusion_pytorch_model.bin")
    w.unlink()
    line = assert_one_line_exit_2("apply", root, d, "-o", tmp_path / "o")
    assert line.startswith("vpatch: PickleRefused:") and "vpatch convert" in line
    assert not (tmp_path / "o").exists()
    for kw in ({}, {"_use_new_zipfile_serialization": False}):
        torch.save({"w": torch.ones(2)}, tmp_path / "t.bin", **kw)
        line = assert_one_line_exit_2("import-lora", tmp_path / "t.bin", "-o", tmp_path / "x.vud")
        # a LoRA cannot be converted into one: no conversion advice here
        assert line.startswith("vpatch: PickleRefused:") and "--trust-pickle" not in line
        line = assert_one_line_exit_2("inspect", tmp_path / "t.bin")
        assert line.startswith("vpatch: PickleRefused:") and "--trust-pickle" in line
    assert not (tmp_path / "x.vud").exists()


def test_inspect_lists_a_pickle_only_component(tmp_path, pipe):
    """inspect listed weight sets only, so a component of pickles vanished from its listing."""
    root, _, _ = pipe
    (w,) = (root / "transformer").glob("*.safetensors")
    torch.save({"w": torch.ones(2)}, root / "transformer" / "diffusion_pytorch_model.bin")
    w.unlink()
    code, out, _ = invoke("inspect", root)
    assert code == 0
    (line,) = [x for x in out.splitlines() if "diffusion_pytorch_model.bin" in x]
    assert line.strip().startswith("transformer:") and "cannot edit this component" in line
    code, out, _ = invoke("inspect", root, "--json")
    info = json.loads(out)
    assert info["pickle_files"] == [
        {"component": "transformer", "file": "diffusion_pytorch_model.bin", "only": True}
    ]
    assert all(s["component"] != "transformer" for s in info["weight_sets"])
    # beside safetensors weights: inspect said "ignored" while apply refuses the component
    save_file({"w": torch.ones(2)}, root / "transformer" / "diffusion_pytorch_model.safetensors")
    code, out, _ = invoke("inspect", root)
    (line,) = [x for x in out.splitlines() if "diffusion_pytorch_model.bin" in x]
    assert "apply refuses this component" in line and "ignored" not in line


def test_a_truncated_safetensors_header_is_not_called_a_pickle(tmp_path):
    """A header length of 640 begins with bytes 0x80 0x02, like a pickle; cut short, the file is
    a truncated safetensors file, not a pickle."""
    from patcher.errors import FormatError

    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", 640) + b"{" * 492)
    with pytest.raises(FormatError, match="runs past the end"):
        read_header(f)


def test_component_on_a_pipeline_folder_is_refused(tmp_path, pipe):
    """--component nonsense on a pipeline folder was ignored (exit 0); it names what a bare file
    or component folder is."""
    root, d, _ = pipe
    line = assert_one_line_exit_2(
        "apply", root, d, "-o", tmp_path / "o", "--component", "nonsense", match="pipeline folder"
    )
    assert "--component nonsense" in line and not (tmp_path / "o").exists()
    (comp,) = [
        p for p in root.iterdir() if (p / "config.json").is_file() and p.name == "transformer"
    ]
    code, _, err = invoke("apply", comp, d, "-o", tmp_path / "c", "--component", "transformer")
    assert code == 0, err


# --------------------------------------------------------------------------- 5: concurrent runs


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_5_an_output_that_appears_during_the_run_is_never_replaced(
    tmp_path, pipe, monkeypatch, layout
):
    """Two applies to the same -o: the second to finish must fail, not replace the first's output."""
    writer = _module_with("patch_file", "_patch_file")
    name = "patch_file" if hasattr(writer, "patch_file") else "_patch_file"
    root, d, _ = pipe
    src = (
        root if layout == "folder" else root / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    out = tmp_path / ("out" if layout == "folder" else "out.safetensors")
    real = getattr(writer, name)

    def other_run_finishes_first(*a, **kw):
        if layout == "folder":
            out.mkdir()
            (out / "theirs.txt").write_text("the other run's output")
        else:
            out.write_text("the other run's output")
        return real(*a, **kw)

    monkeypatch.setattr(writer, name, other_run_finishes_first)
    with pytest.raises(OutputError, match="appeared while"):
        patcher.apply_delta(src, d, out)
    mark = out / "theirs.txt" if layout == "folder" else out
    assert mark.read_text() == "the other run's output" and leftovers(tmp_path) == []


def test_5_rename_noreplace_is_atomic(tmp_path):
    from patcher.output import rename_noreplace

    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "dst"
    a.write_text("a")
    b.write_text("b")
    rename_noreplace(a, dst)
    with pytest.raises(OutputError):
        rename_noreplace(b, dst)
    assert dst.read_text() == "a" and b.exists()


# --------------------------------------------------------------------------- 6: signals

SLOW_APPLY = """
import sys, time
from pathlib import Path
try:
    import patcher.merge.kernel as k
except ImportError:  # the layout before the merge engine split
    import patcher.merge.engine as k
real = k._edit_rows
def slow(*a, **kw):
    Path(sys.argv[1]).write_text("ready")
    time.sleep(60)
    return real(*a, **kw)
k._edit_rows = slow
from patcher.cli import main
main(["apply", sys.argv[2], sys.argv[3], "-o", sys.argv[4], "-q"])
"""


def _start_slow_apply(tmp_path, src, d, out):
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_APPLY, str(ready), str(src), str(d), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not ready.exists():
        if proc.poll() is not None or time.time() - t0 > 240:
            proc.kill()
            pytest.fail(f"the apply did not start: {proc.communicate()}")
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_6_sigterm_and_sighup_remove_the_temporaries(tmp_path, pipe, sig):
    root, d, _ = pipe
    work = tmp_path / "work"
    work.mkdir()
    proc = _start_slow_apply(tmp_path, root, d, work / "out")
    assert leftovers(work)  # the temporary exists while the run works
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "no output was written" in err and "Traceback" not in err
    assert os.listdir(work) == []


def test_6_the_next_run_removes_what_a_killed_run_left(tmp_path, pipe):
    root, d, _ = pipe
    work = tmp_path / "work"
    work.mkdir()
    proc = _start_slow_apply(tmp_path, root, d, work / "out")
    proc.kill()
    proc.wait(timeout=60)
    stale = leftovers(work)
    assert stale
    r = patcher.apply_delta(root, d, work / "out")
    assert leftovers(work) == [] and (work / "out").is_dir()
    assert any("interrupted run" in w and stale[0] in w for w in r.warnings)


# --------------------------------------------------------------------------- 11: stored strength


def test_11_a_deltas_stored_strength_is_bounded_like_the_option(tmp_path):
    t = model_tensors(torch.float32)
    save_file(t, tmp_path / "m.safetensors")
    good = make_delta(tmp_path / "d.vud", t)
    e = good.entries[0]
    huge = DeltaEntry(e.key, e.shape, "add", 1e30, e.U * 1e30, e.V)
    write_delta(tmp_path / "huge.vud", Delta([huge], {"name": "x"}, {}))
    with pytest.raises(VpatchError, match="strength"):
        patcher.apply_delta(tmp_path / "m.safetensors", tmp_path / "huge.vud", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert_one_line_exit_2(
        "apply", tmp_path / "m.safetensors", tmp_path / "huge.vud", "-o", tmp_path / "o"
    )


# --------------------------------------------------------------------------- tracebacks -> exit 2


@pytest.mark.parametrize("where", ["key", "metadata"])
def test_lone_surrogate_in_the_checkpoint_is_exit_2(tmp_path, bf16_model, where):
    src, d, t, _ = bf16_model

    def change(h):
        if where == "key":
            h["x\ud800"] = h.pop("blocks.0.norm.bias")
        else:
            h["__metadata__"]["note"] = "\ud800"

    rewrite_header(src, tmp_path / "bad.safetensors", change)
    assert_one_line_exit_2(
        "apply", tmp_path / "bad.safetensors", d, "-o", tmp_path / "o", match="surrogate"
    )
    # revert: a patched file whose metadata was given a lone surrogate afterwards
    patcher.apply_delta(src, d, tmp_path / "p.safetensors")
    rewrite_header(tmp_path / "p.safetensors", tmp_path / "pbad.safetensors", change)
    assert_one_line_exit_2(
        "revert", tmp_path / "pbad.safetensors", d, "-o", tmp_path / "r", match="surrogate"
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def _record_case(tmp_path, bf16_model):
    src, d, _, _ = bf16_model
    patcher.apply_delta(src, d, tmp_path / "p.safetensors", revert_record=tmp_path / "rec")
    return tmp_path / "p.safetensors", d, tmp_path / "rec"


@pytest.mark.parametrize(
    "tamper",
    ["U-dtype", "U-shape", "no-fix-value", "no-originals", "originals-list", "index-out-of-range"],
)
def test_tampered_revert_record_is_exit_2_and_says_it_does_not_match(tmp_path, bf16_model, tamper):
    p, d, rec = _record_case(tmp_path, bf16_model)
    h = read_header(rec)
    first = next(n for n in h.tensors if n.endswith("::U"))
    base = first[: -len("::U")]
    tensors = load_file(rec)
    meta = dict(h.metadata)
    if tamper == "U-dtype":
        tensors[first] = tensors[first].to(torch.int64)
    elif tamper == "U-shape":
        tensors[first] = torch.zeros(3, 7)
    elif tamper == "no-fix-value":
        del tensors[f"{base}::fix_value"]
    elif tamper == "no-originals":
        del meta["vpatch.originals"]
    elif tamper == "originals-list":
        meta["vpatch.originals"] = "[1, 2]"
    else:
        tensors[f"{base}::fix_index"] = torch.tensor([10**9])
        tensors[f"{base}::fix_value"] = torch.zeros(1, dtype=torch.bfloat16)
    bad = tmp_path / "bad.rec"
    save_file(tensors, bad, metadata=meta)
    line = assert_one_line_exit_2("revert", p, d, "-o", tmp_path / "r", "--record", bad)
    assert "does not match" in line and "rounding" not in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "value",
    [
        '[{"delta_sha256": 5}]',
        "{}",
        '[{"delta_sha256": "SHA", "strength": "strong"}]',
        '[{"delta_sha256": "SHA", "diverged": 7}]',
        '[{"delta_sha256": "SHA", "mode": ["x"]}]',
    ],
)
def test_tampered_provenance_is_exit_2(tmp_path, bf16_model, value):
    src, d, _, dl = bf16_model
    patcher.apply_delta(src, d, tmp_path / "p.safetensors")
    value = value.replace("SHA", dl.sha256)
    rewrite_header(
        tmp_path / "p.safetensors",
        tmp_path / "bad.safetensors",
        lambda h: h["__metadata__"].__setitem__("vpatch.applied", value),
    )
    line = assert_one_line_exit_2("revert", tmp_path / "bad.safetensors", d, "-o", tmp_path / "r")
    assert "vpatch.applied" in line
    assert_one_line_exit_2("apply", tmp_path / "bad.safetensors", d, "-o", tmp_path / "a")
    assert_one_line_exit_2("inspect", tmp_path / "bad.safetensors")


def test_out_name_over_255_bytes_is_exit_2(tmp_path, bf16_model):
    src, d, _, _ = bf16_model
    assert_one_line_exit_2("apply", src, d, "-o", tmp_path / ("x" * 300), match="255")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.ENOSPC])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_unwritable_output_folder_is_exit_2(tmp_path, monkeypatch, err, layout):
    """Read-only file system, a folder without write permission, no free inode: creating anything
    in the output folder fails with ``err`` (simulated: the tests run as root)."""
    t = model_tensors(torch.bfloat16)
    src = save_pipeline(tmp_path / "pipe", t)
    make_delta(tmp_path / "d.vud", t)
    if layout == "file":
        src = src / "transformer" / "diffusion_pytorch_model.safetensors"
    dest = tmp_path / "dest"
    dest.mkdir()
    real_open, real_mkdir, real_access = os.open, os.mkdir, os.access

    def refuse(path):
        return str(path).startswith(str(dest))

    def fake_open(path, flags, *a, **kw):
        if refuse(path) and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *a, **kw)

    def fake_mkdir(path, *a, **kw):
        if refuse(path):
            raise OSError(err, os.strerror(err), str(path))
        return real_mkdir(path, *a, **kw)

    def fake_access(path, mode, *a, **kw):
        if err != errno.ENOSPC and str(path) == str(dest) and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "access", fake_access)
    assert_one_line_exit_2("apply", src, tmp_path / "d.vud", "-o", dest / "out")
    monkeypatch.undo()
    assert os.listdir(dest) == []


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_fifo_or_device_as_checkpoint_is_exit_2(tmp_path, bf16_model, kind):
    _, d, _, _ = bf16_model
    if kind == "fifo":
        ck = tmp_path / "ck.safetensors"
        os.mkfifo(ck)
    else:
        ck = Path("/dev/null")
    assert_one_line_exit_2("apply", ck, d, "-o", tmp_path / "o", match="not a regular file")
    assert_one_line_exit_2("inspect", ck, match="not a regular file")


def test_fifo_inside_a_pipeline_folder_is_refused_not_read(tmp_path, pipe):
    root, d, _ = pipe
    os.mkfifo(root / "scheduler" / "pipe")
    assert_one_line_exit_2("apply", root, d, "-o", tmp_path / "o", match="FIFO")


def test_unreadable_weight_file_in_a_component_folder_is_exit_2(tmp_path, pipe, monkeypatch):
    root, d, _ = pipe
    locked = root / "transformer" / "diffusion_pytorch_model.safetensors"
    real_open, real_builtin = os.open, open

    def fake_open(path, flags, *a, **kw):
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    def fake_builtin(path, *a, **kw):
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_builtin(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr("builtins.open", fake_builtin)
    line = assert_one_line_exit_2("apply", root / "transformer", d, "-o", tmp_path / "o")
    assert "cannot be read" in line and locked.name in line


# --------------------------------------------------------------------------- unclear messages


def test_revert_with_another_applys_record_says_the_record_does_not_match(tmp_path):
    base = model_tensors(torch.bfloat16, seed=0)
    other = model_tensors(torch.bfloat16, seed=5)
    save_file(base, tmp_path / "a.safetensors")
    save_file(other, tmp_path / "b.safetensors")
    make_delta(tmp_path / "d.vud", base)
    patcher.apply_delta(tmp_path / "a.safetensors", tmp_path / "d.vud", tmp_path / "pa.safetensors")
    patcher.apply_delta(
        tmp_path / "b.safetensors",
        tmp_path / "d.vud",
        tmp_path / "pb.safetensors",
        revert_record=tmp_path / "b.rec",
    )
    with pytest.raises(RevertError) as ei:
        patcher.revert_delta(
            tmp_path / "pa.safetensors",
            tmp_path / "d.vud",
            tmp_path / "r.safetensors",
            record=tmp_path / "b.rec",
        )
    assert "does not match" in str(ei.value) and "rounding" not in str(ei.value)
    assert not (tmp_path / "r.safetensors").exists()


def test_revert_record_inside_the_out_folder_fails_before_any_work(tmp_path, pipe, monkeypatch):
    kernel = _module_with("_edit_rows")
    root, d, _ = pipe
    calls = []
    monkeypatch.setattr(kernel, "_edit_rows", lambda *a, **kw: calls.append(1))
    with pytest.raises(OutputError, match="revert-record"):
        patcher.apply_delta(root, d, tmp_path / "out", revert_record=tmp_path / "out" / "rec")
    assert calls == [] and not (tmp_path / "out").exists()


def test_extra_file_in_a_component_folder_is_named_in_the_message(tmp_path, pipe):
    root, d, _ = pipe
    save_file({"lora.weight": torch.zeros(2, 2)}, root / "transformer" / "extra.safetensors")
    code, _out, err = invoke("apply", root, d, "-o", tmp_path / "o")
    line = err.splitlines()[0]
    assert code == 2 and line.startswith("vpatch: CompatibilityError"), err
    assert "extra.safetensors" in line and "variant" in line


def test_compatibility_error_comes_first_then_its_coverage(tmp_path):
    t = {"other.weight": torch.zeros(4, 24)}
    save_file(t, tmp_path / "x.safetensors")
    make_delta(tmp_path / "x.vud", model_tensors(torch.float32))
    code, _out, err = invoke(
        "apply", tmp_path / "x.safetensors", tmp_path / "x.vud", "-o", tmp_path / "o"
    )
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[0].startswith("vpatch: CompatibilityError: the delta does not fit"), err
    assert any(x.startswith("coverage: 0/2") for x in lines[1:]), err


def test_header_just_under_the_limit_is_not_refused_for_the_outputs_padding(tmp_path):
    from patcher.safetensors_io import MAX_HEADER_SIZE

    t = model_tensors(torch.bfloat16)
    make_delta(tmp_path / "d.vud", t)
    save_file(t, tmp_path / "m.safetensors", metadata={"big": "x" * (MAX_HEADER_SIZE - 20_000)})
    assert read_header(tmp_path / "m.safetensors").data_start < MAX_HEADER_SIZE
    patcher.apply_delta(tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors")
    out = load_file(tmp_path / "o.safetensors")
    assert not torch.equal(out[K], t[K])


def test_a_header_of_a_million_empty_tensors_is_refused_quickly(tmp_path):
    from patcher.safetensors_io import MAX_TENSORS

    n = MAX_TENSORS + 1
    hdr = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    text = json.dumps(hdr, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    p = tmp_path / "many.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text)
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="tensors"):
        read_header(p)
    assert time.perf_counter() - t0 < 5
    assert_one_line_exit_2("inspect", p, match=str(MAX_TENSORS))


def test_output_folders_have_the_permissions_of_a_plain_copy(tmp_path, pipe):
    root, d, _ = pipe
    mask = os.umask(0)
    os.umask(mask)
    patcher.apply_delta(root, d, tmp_path / "out")
    for p in [tmp_path / "out", *(x for x in (tmp_path / "out").rglob("*") if x.is_dir())]:
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask, p
    for p in (x for x in (tmp_path / "out").rglob("*") if x.is_file()):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
