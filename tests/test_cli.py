import json
import os
import struct
import subprocess
import sys

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from patcher.cli import main

from .conftest import make_delta, model_tensors, save_pipeline


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_apply_json_and_inspect(tmp_path, bf16_model):
    src, d, t, delta = bf16_model
    code, out, err = run("apply", src, d, "-o", tmp_path / "o.safetensors", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert (
        rep["action"] == "apply"
        and rep["delta_sha256"] == delta.sha256
        and len(rep["tensors"]) == 2
    )
    code, out, _ = run("inspect", tmp_path / "o.safetensors", "--json")
    assert code == 0 and json.loads(out)["applied"][0]["concept"] == "red"
    code, out, _ = run("inspect", d, "--json")
    info = json.loads(out)
    assert code == 0 and info["type"] == "delta" and [L["rank"] for L in info["layers"]] == [1, 1]
    code, out, _ = run("inspect", d)
    assert code == 0 and delta.sha256 in out and "project_input" in out
    code, out, _ = run("inspect", tmp_path / "o.safetensors")
    assert code == 0 and "applied: red" in out


def test_dry_run_prints_plan_on_stderr(tmp_path, bf16_model):
    src, d, *_ = bf16_model
    code, out, err = run("apply", src, d, "--dry-run")
    assert code == 0 and "estimated peak memory" in err and "bytes to write" in err


def _bad_inputs(tmp_path, src, d):
    (tmp_path / "notst.safetensors").write_text("hello, I am text")
    (tmp_path / "trunc.safetensors").write_bytes(src.read_bytes()[:100])
    (tmp_path / "hugehdr.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops")
    torch.save({"w": torch.zeros(1)}, tmp_path / "m.bin")
    other = model_tensors(torch.float32, in_dim=16)
    save_file(other, tmp_path / "other.safetensors")
    return {
        "not safetensors": (
            [tmp_path / "notst.safetensors", d, "-o", tmp_path / "o1"],
            "FormatError",
        ),
        "truncated": ([tmp_path / "trunc.safetensors", d, "-o", tmp_path / "o2"], "FormatError"),
        "header bound": (
            [tmp_path / "hugehdr.safetensors", d, "-o", tmp_path / "o3"],
            "FormatError",
        ),
        "bad json": ([tmp_path / "json.safetensors", d, "-o", tmp_path / "o4"], "FormatError"),
        "pickle": ([tmp_path / "m.bin", d, "-o", tmp_path / "o5"], "PickleRefused"),
        "other model": (
            [tmp_path / "other.safetensors", d, "-o", tmp_path / "o6"],
            "CompatibilityError",
        ),
        "missing out folder": ([src, d, "-o", tmp_path / "nope" / "o.safetensors"], "OutputError"),
        "delta is a checkpoint": ([src, src, "-o", tmp_path / "o7"], "DeltaError"),
        "no such file": ([tmp_path / "ghost.safetensors", d, "-o", tmp_path / "o8"], "FormatError"),
    }


def test_bad_input_is_one_line_exit_2_no_traceback_no_output(tmp_path, bf16_model):
    src, d, *_ = bf16_model
    for name, (args, err_name) in _bad_inputs(tmp_path, src, d).items():
        code, out, err = run("apply", *args)
        assert code == 2, (name, err)
        lines = [
            line
            for line in err.splitlines()
            if line.strip() and not line.startswith(("coverage:", "  "))
        ]
        assert len(lines) == 1 and lines[0].startswith(f"vpatch: {err_name}:"), (name, err)
        assert "Traceback" not in err and out == ""
    assert not any(
        p.name.startswith("o") and p.name != "other.safetensors" for p in tmp_path.iterdir()
    )


def test_usage_errors_are_one_line_exit_2(tmp_path):
    """A missing argument, an unknown option, a bad value or command printed four lines (Usage,
    Try, a blank, Error); now one, naming the help to read. A bare `vpatch` shows the help."""
    cases = {
        ("apply",): ("Missing argument 'CHECKPOINT'", "vpatch apply --help"),
        ("apply", "a", "b", "--nope"): ("No such option '--nope'", "vpatch apply --help"),
        ("apply", "a", "b", "--strength", "abc"): ("'abc' is not a valid float", "apply --help"),
        ("nosuch",): ("No such command 'nosuch'", "(see vpatch --help)"),
    }
    for args, (msg, hint) in cases.items():
        res = CliRunner().invoke(main, list(args))
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and res.stdout == "", (args, res.output)
        assert len(lines) == 1 and lines[0].startswith("vpatch: UsageError: "), (args, lines)
        assert msg in lines[0] and hint in lines[0], (args, lines)
    # run as `python -m patcher.cli` (as examples/quickstart.py does) the hint still says vpatch
    p = subprocess.run(
        [sys.executable, "-m", "patcher.cli", "apply"], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.strip().endswith("(see vpatch apply --help)"), p.stderr
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0 and "Usage: " in res.stdout and "apply" in res.stdout
    res = CliRunner().invoke(main, ["apply", "--help"])
    assert res.exit_code == 0 and " apply [OPTIONS]" in res.stdout


def test_coverage_report_printed_before_the_error(tmp_path):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    del t["blocks.0.attn2.to_v.weight"]
    save_file(t, tmp_path / "m.safetensors")
    code, out, err = run(
        "apply", tmp_path / "m.safetensors", tmp_path / "d.vud", "-o", tmp_path / "o.safetensors"
    )
    assert (
        code == 2
        and "coverage: 1/2" in err
        and "missing  transformer/blocks.0.attn2.to_v.weight" in err
    )


def test_console_script_end_to_end(tmp_path):
    t = model_tensors(torch.bfloat16)
    src = save_pipeline(tmp_path / "pipe", t)
    make_delta(tmp_path / "d.vud", t)
    exe = [sys.executable, "-m", "patcher.cli"]
    r = subprocess.run(
        exe + ["apply", str(src), str(tmp_path / "d.vud"), "-o", str(tmp_path / "safe"), "-q"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "safe")
    r = subprocess.run(
        exe
        + ["apply", str(tmp_path / "safe"), str(tmp_path / "d.vud"), "-o", str(tmp_path / "again")],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and r.stderr.startswith("vpatch: AlreadyApplied:")
        and "Traceback" not in r.stderr
    )


def test_error_after_progress_started_is_stderrs_first_line(tmp_path):
    # the Inf is found while writing, after the progress bar started; piped, rich left a blank
    # line first, so a script reading the first line of stderr got nothing
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    save_file(t, tmp_path / "good.safetensors")
    t["blocks.0.attn2.to_k.weight"][3, 3] = float("inf")
    save_file(t, tmp_path / "m.safetensors")
    exe = [sys.executable, "-m", "patcher.cli", "apply"]
    env = {**os.environ, "FORCE_COLOR": "1"}  # set in many CI runners: rich then calls a pipe a tty
    r = subprocess.run(
        exe + [str(tmp_path / "m.safetensors"), str(tmp_path / "d.vud"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.startswith("vpatch: NumericError: "), r.stderr
    good = [str(tmp_path / "good.safetensors"), str(tmp_path / "d.vud")]
    r = subprocess.run(
        exe + [*good, "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and r.stderr.startswith("coverage: 2/2"), r.stderr
    # on a terminal the bar is still drawn
    import pty

    main_fd, tty_fd = pty.openpty()
    p = subprocess.Popen(
        exe + [*good, "-o", str(tmp_path / "o2")],
        stdout=subprocess.DEVNULL,
        stderr=tty_fd,
        env={**os.environ, "TERM": "xterm"},
    )
    os.close(tty_fd)
    seen = b""
    while True:  # read while it writes: a full pty buffer would block the child
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(main_fd)
    assert p.wait(timeout=60) == 0 and b"writing" in seen, seen[-500:]


def test_help_teaches(tmp_path):
    code, out, _ = run("apply", "--help")
    assert code == 0 and "Examples:" in out and "--revert-record" in out and "--dry-run" in out
    # without -o apply writes next to the input (issue 11), so a missing input is what is reported
    code, out, err = run("apply", "a", "b")
    assert code == 2 and "no such file or folder" in err
    assert "model.no-nudity.safetensors" in run("apply", "--help")[1]


def test_inspect_shows_how_a_delta_resolves(tmp_path, bf16_model):
    import json as _json

    from click.testing import CliRunner as _R

    from patcher.cli import main as _main

    ck, d, t, _ = bf16_model
    res = _R().invoke(_main, ["inspect", str(ck), "--delta", str(d), "--json"])
    assert res.exit_code == 0, res.output
    info = _json.loads(res.stdout)
    assert (
        info["verdict"] == "compatible"
        and info["coverage"]["matched"] == info["coverage"]["expected"] >= 1
    )
    assert all(
        r["status"] == "matched" and r["fingerprint"] == "base" and r["files"]
        for r in info["entries"]
    )
    # a checkpoint missing one of the targeted tensors: partial, and the row says why
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ck))
    missing = info["entries"][0]["key"].split("/", 1)[1]
    sd.pop(missing)
    save_file(sd, str(tmp_path / "partial.safetensors"))
    info = _json.loads(
        _R()
        .invoke(
            _main, ["inspect", str(tmp_path / "partial.safetensors"), "--delta", str(d), "--json"]
        )
        .stdout
    )
    assert info["verdict"] == "partial"
    row = next(r for r in info["entries"] if r["key"].endswith(missing))
    assert row["status"] == "missing" and missing in row["note"]
    # a checkpoint that already carries the delta: apply refuses it, inspect said "compatible"
    import patcher

    patcher.apply_delta(ck, d, tmp_path / "patched.safetensors")
    res = _R().invoke(
        _main, ["inspect", str(tmp_path / "patched.safetensors"), "--delta", str(d), "--json"]
    )
    info = _json.loads(res.stdout)
    assert res.exit_code == 0 and info["verdict"] == "already applied"
    assert any("already contains this delta" in w for w in info["warnings"])
