"""Fuzz targets shared by tests/test_fuzz.py (CI size) and benchmarks/fuzz.py (long run).

Each target takes data drawn by hypothesis, builds a damaged input in a fresh folder (a revert
record, ``vpatch.applied`` provenance, a delta's layer map, a folder to push, an output name), calls
the public API on it and checks the three properties vpatch promises for any input:

- the call returns or raises a ``VpatchError`` (anything else is a bug);
- a failed call leaves nothing new behind (no partial output, no temporary);
- no file that existed before is modified (inputs, deltas, unrelated files).

``Tally`` counts outcomes; without one, a violation raises ``AssertionError`` (the CI tests).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import patcher
from patcher.errors import VpatchError

from .conftest import K, V, make_delta, model_tensors, save_pipeline

# ------------------------------------------------------------------ outcomes


@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    clean_errors: int = 0
    other_exceptions: list[str] = field(default_factory=list)
    partial_outputs: list[str] = field(default_factory=list)
    inputs_modified: list[str] = field(default_factory=list)
    per_target: dict[str, list[int]] = field(
        default_factory=dict
    )  # call -> [cases, ok, clean, other]


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = Path(dp) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("other",)
    return out


def call(
    target: str,
    fn: Callable[[], object],
    work: Path,
    outputs: tuple[Path, ...] = (),
    tally: Tally | None = None,
    must_fail: bool = False,
) -> str:
    """Run one API call inside ``work`` and check the properties; returns ok | clean."""
    before = _tree(work)
    problem = kind = None
    try:
        fn()
        kind = "ok"
    except VpatchError:
        kind = "clean"
    except Exception as e:  # noqa: BLE001 - the property under test
        tb = traceback.extract_tb(e.__traceback__)[-1]
        problem = (
            "other",
            f"{target}: {type(e).__name__}: {str(e)[:160]} at {tb.filename}:{tb.lineno}",
        )
    after = _tree(work)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    new = sorted(set(after) - set(before))
    allowed = [o.relative_to(work).as_posix() for o in outputs]
    if kind == "ok":
        stray = [n for n in new if not any(n == a or n.startswith(a + "/") for a in allowed)]
    else:
        stray = new
    if must_fail and kind == "ok":
        problem = problem or ("other", f"{target}: accepted an input it must refuse")
    if tally is not None:
        tally.cases += 1
        row = tally.per_target.setdefault(target, [0, 0, 0, 0])
        row[0] += 1
        if problem:
            tally.other_exceptions.append(problem[1])
            row[3] += 1
        elif kind == "ok":
            tally.ok += 1
            row[1] += 1
        else:
            tally.clean_errors += 1
            row[2] += 1
        if stray:
            tally.partial_outputs.append(f"{target}: {stray[:3]}")
        if changed:
            tally.inputs_modified.append(f"{target}: {changed[:3]}")
        return kind or "other"
    assert not problem, problem[1]
    assert not stray, f"{target}: left behind {stray[:5]} after a {kind} call"
    assert not changed, f"{target}: modified {changed[:5]}"
    return kind


# ------------------------------------------------------------------ base files


class Base:
    """Small valid inputs, built once per process and copied into every case's folder."""

    _dir: Path | None = None

    @classmethod
    def get(cls) -> Path:
        if cls._dir is None:
            d = Path(tempfile.mkdtemp(prefix="vpatch-fuzz-base-"))
            atexit.register(shutil.rmtree, d, True)
            t = model_tensors()
            save_file(t, d / "m.safetensors", metadata={"format": "pt"})
            make_delta(d / "d.vud", t)
            patcher.apply_delta(
                d / "m.safetensors", d / "d.vud", d / "p.safetensors", revert_record=d / "rec"
            )
            src = save_pipeline(d / "base", t)
            patcher.apply_delta(src, d / "d.vud", d / "safe")
            torch.save({"state_dict": {"w": torch.zeros(3)}}, d / "m.pt")
            cls._dir = d
        return cls._dir


def workdir(*names: str) -> Path:
    base = Base.get()
    work = Path(tempfile.mkdtemp(prefix="vpatch-fuzz-"))
    for n in names:
        s = base / n
        if s.is_dir():
            shutil.copytree(s, work / n, symlinks=True)
        else:
            shutil.copy2(s, work / n)
    return work


def meta_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# ------------------------------------------------------------------ strategies

_text = st.text(
    st.characters(codec="utf-8"), max_size=12
)  # no lone surrogates: file names, metadata
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)  # may hold lone surrogates: JSON escapes them
    | st.sampled_from(
        ["F32", "BF16", "I64", "F8_E4M3", "add", "project_input", "recompute", "factors"]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
# JSON nested past the parser's recursion limit is a classic way to crash a reader
deep_json = st.sampled_from([50, 5000, 100000]).map(lambda n: "[" * n + "]" * n)
metadata_values = json_values.map(json.dumps) | _text | deep_json


# ------------------------------------------------------------------ target: revert records

_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.float64,
]


@st.composite
def record_mutations(draw) -> list[tuple]:
    names = sorted(load_file(Base.get() / "rec"))
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(
            st.sampled_from(["meta", "drop", "dtype", "shape", "values", "rename", "extra"])
        )
        if what == "meta":
            key = draw(
                st.sampled_from(["vpatch.format", "vpatch.delta_sha256", "vpatch.originals"])
            )
            ops.append(("meta", key, draw(st.none() | metadata_values | st.just("vud-revert"))))
        elif what == "dtype":
            ops.append(("dtype", draw(st.sampled_from(names)), draw(st.sampled_from(_DTYPES))))
        elif what == "shape":
            shape = draw(st.lists(st.integers(0, 50), min_size=0, max_size=3))
            ops.append(("shape", draw(st.sampled_from(names)), shape))
        elif what == "values":
            ops.append(("values", draw(st.sampled_from(names)), draw(st.integers(-(2**40), 2**40))))
        elif what == "rename":
            ops.append(
                ("rename", draw(st.sampled_from(names)), draw(st.sampled_from(names + ["x::U"])))
            )
        elif what == "extra":
            ops.append(("extra", draw(_text.filter(bool)) + "::U"))
        else:
            ops.append(("drop", draw(st.sampled_from(names))))
    return ops


def _mutate_record(src: Path, dst: Path, ops: list[tuple]) -> None:
    t = load_file(src)
    meta = meta_of(src)
    for op in ops:
        if op[0] == "meta":
            if op[2] is None:
                meta.pop(op[1], None)
            else:
                meta[op[1]] = op[2]
        elif op[1] not in t and op[0] != "extra":
            continue
        elif op[0] == "drop":
            del t[op[1]]
        elif op[0] == "dtype":
            t[op[1]] = t[op[1]].to(op[2])
        elif op[0] == "shape":
            n = 1
            for d in op[2]:
                n *= d
            flat = t[op[1]].reshape(-1)
            flat = (
                flat[:n]
                if flat.numel() >= n
                else torch.cat([flat, flat.new_ones(n - flat.numel())])
            )
            t[op[1]] = flat.reshape(op[2]).clone()
        elif op[0] == "values":
            x = t[op[1]]
            t[op[1]] = (
                torch.full_like(x, op[2]) if x.dtype == torch.int64 else x * float(op[2] % 1000)
            ).contiguous()
        elif op[0] == "rename":
            t[op[2]] = t.pop(op[1])
        elif op[0] == "extra":
            t[op[1]] = torch.zeros(2, 3)
    save_file({k: v.contiguous() for k, v in t.items()}, dst, metadata=meta)


def revert_record_case(ops: list[tuple], tally: Tally | None = None) -> None:
    work = workdir("p.safetensors", "d.vud", "rec")
    try:
        _mutate_record(work / "rec", work / "rec2", ops)
        out = work / "out.safetensors"
        call(
            "revert-record",
            lambda: patcher.revert_delta(
                work / "p.safetensors", work / "d.vud", out, record=work / "rec2"
            ),
            work,
            (out,),
            tally,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ target: provenance


def known_provenance(**fields) -> str:
    """The real provenance record with some fields replaced (explicit examples)."""
    real = json.loads(meta_of(Base.get() / "p.safetensors")["vpatch.applied"])[0]
    return json.dumps([{**real, **fields}])


@st.composite
def provenance_values(draw) -> str:
    real = json.loads(meta_of(Base.get() / "p.safetensors")["vpatch.applied"])[0]
    if draw(st.booleans()):
        return draw(metadata_values)
    recs = []
    for _ in range(draw(st.integers(0, 3))):
        rec = dict(real)
        for k in draw(st.lists(st.sampled_from(sorted(real) + ["extra"]), max_size=4)):
            rec[k] = draw(json_values)
        if draw(st.booleans()):
            rec.pop(draw(st.sampled_from(sorted(real))), None)
        recs.append(rec)
    return json.dumps(recs)


PROVENANCE_CALLS = ("inspect", "apply", "revert", "push")


def provenance_case(
    value: str, tally: Tally | None = None, calls: tuple[str, ...] = PROVENANCE_CALLS
) -> None:
    work = workdir("p.safetensors", "d.vud")
    try:
        meta = meta_of(work / "p.safetensors")
        meta["vpatch.applied"] = value
        folder = work / "folder"
        folder.mkdir()
        save_file(load_file(work / "p.safetensors"), folder / "model.safetensors", metadata=meta)
        ck = folder / "model.safetensors"
        o1, o2, st_ = work / "a.safetensors", work / "r.safetensors", work / "stage"
        if "inspect" in calls:
            call("provenance-inspect", lambda: patcher.inspect_path(ck), work, (), tally)
        if "apply" in calls:
            call(
                "provenance-apply",
                lambda: patcher.apply_delta(ck, work / "d.vud", o1),
                work,
                (o1,),
                tally,
            )
        if "revert" in calls:
            call(
                "provenance-revert",
                lambda: patcher.revert_delta(ck, work / "d.vud", o2),
                work,
                (o2,),
                tally,
            )
        from patcher.push import push

        if "push" in calls:
            call(
                "provenance-push",
                lambda: push(folder, "me/x", delta=work / "d.vud", dry_run=True, stage=st_),
                work,
                (st_,),
                tally,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ target: layer maps

_FIELDS = ["key", "shape", "kind", "strength", "rank", "base_sha256", "base_dtype"]
_INTERESTING = st.sampled_from(
    [
        f"transformer/{K}",
        f"transformer/{V}",
        "transformer/missing.weight",
        "text_encoder/x.weight",
        [40, 24],
        [24, 40],
        [40, 0],
        0,
        1,
        2,
        40,
        -1,
        1e308,
        1e-30,
        -3.5,
        "0" * 64,
        "F32",
        "BF16",
        "I64",
        "F8_E4M3",
        "add",
        "project_input",
    ]
)


_VALID = {
    "kind": st.sampled_from(["add", "project_input"]),
    "strength": st.floats(-1e6, 1e6) | st.sampled_from([0.0, 1e300, -1e300, 1e-30]),
    "base_sha256": st.sampled_from([None, "0" * 64, "f" * 64]),
    "base_dtype": st.sampled_from([None, "F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "F64"]),
}


def _rehash(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The version-2 hash of a damaged map, so that damage reaches past the integrity check."""
    h = hashlib.sha256()
    lm = json.loads(meta["vpatch.layer_map"])
    canon = [  # as the reader records them: strengths are floats
        {**r, "strength": float(r["strength"])}
        if isinstance(r, dict) and type(r.get("strength")) is int and abs(r["strength"]) < 1e300
        else r
        for r in lm
    ]
    h.update(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
    cm = {
        "concept": json.loads(meta["vpatch.concept"]),
        "method": json.loads(meta["vpatch.method"]),
    }
    h.update(json.dumps(cm, sort_keys=True, separators=(",", ":")).encode())
    for rec in lm if isinstance(lm, list) else []:
        for s in ("U", "V"):
            t = tensors.get(f"{rec.get('key') if isinstance(rec, dict) else None}::{s}")
            if t is not None:
                h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


@st.composite
def layer_maps(draw) -> tuple[str, bool]:
    lm = json.loads(meta_of(Base.get() / "d.vud")["vpatch.layer_map"])
    choice = draw(st.integers(0, 9))  # 0: any text, 1: a duplicate entry, 2: an entry less
    if choice == 0:
        return draw(metadata_values), draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lm) - 1))
        how = draw(st.integers(0, 3))
        if how <= 1:  # a value the validator accepts: the damage reaches apply and revert
            f = draw(st.sampled_from(sorted(_VALID)))
            lm[i][f] = draw(_VALID[f])
        elif how == 2:
            lm[i][draw(st.sampled_from(_FIELDS))] = draw(_INTERESTING | json_values)
        else:
            lm[i].pop(draw(st.sampled_from(_FIELDS)), None)
    if choice == 1:
        lm.append(dict(lm[0]))
    if choice == 2:
        lm.pop()
    return json.dumps(lm), draw(st.integers(0, 3)) > 0  # mostly rehashed: reach past the hash


def layer_map_case(drawn: tuple[str, bool], tally: Tally | None = None) -> None:
    value, rehash = drawn
    work = workdir("m.safetensors", "p.safetensors", "d.vud")
    try:
        t = load_file(work / "d.vud")
        meta = meta_of(work / "d.vud")
        meta["vpatch.layer_map"] = value
        if rehash:
            try:
                meta["vpatch.delta_sha256"] = _rehash(meta, t)
            except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
                pass  # not a list of objects: the stored hash stays
        d2 = work / "d2.vud"
        save_file(t, d2, metadata=meta)
        o1, o2 = work / "a.safetensors", work / "r.safetensors"
        call("layer-map-inspect", lambda: patcher.inspect_path(d2), work, (), tally)
        call(
            "layer-map-apply",
            lambda: patcher.apply_delta(work / "m.safetensors", d2, o1),
            work,
            (o1,),
            tally,
        )
        call(
            "layer-map-revert",
            lambda: patcher.revert_delta(work / "p.safetensors", d2, o2, allow_inexact=True),
            work,
            (o2,),
            tally,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ target: push inputs

_name = st.text(
    st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=20
).filter(lambda s: s not in (".", ".."))


@st.composite
def push_inputs(draw) -> dict:
    extras = []
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["", "transformer/", "new/"]))
        what = draw(
            st.sampled_from(
                [
                    "bytes",
                    "delta",
                    "record",
                    "delta-cut",
                    "link-in",
                    "link-out",
                    "link-dir",
                    "link-delta",
                    "fifo",
                ]
            )
        )
        extras.append((where + draw(_name), what, draw(st.binary(max_size=64))))
    report = draw(st.none() | json_values | st.just("valid"))
    return {
        "extras": extras,
        "report": report,
        "delta": draw(st.sampled_from([None, "d.vud", "m.safetensors"])),
    }


_VALID_REPORT = {
    "judge": "organism",
    "seeds": 2,
    "presence": {
        "probe": {
            "before": {"rate": 1.0, "ci95": [0.7, 1.0]},
            "after": {"rate": 0.0, "ci95": [0.0, 0.3]},
        }
    },
    "collateral": {"colour": {"before": {"rate": 1.0}, "after": {"rate": 0.9}}},
}


def push_case(inp: dict, tally: Tally | None = None) -> None:
    from patcher.push import push

    work = workdir("safe", "d.vud", "rec", "m.safetensors")
    try:
        folder = work / "safe"
        must_fail = False
        for name, what, data in inp["extras"]:
            p = folder / name
            if p.exists() or p.is_symlink():
                continue
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
                if what == "bytes":
                    p.write_bytes(data)
                elif what in ("delta", "record"):
                    p.write_bytes((work / ("d.vud" if what == "delta" else "rec")).read_bytes())
                    must_fail |= not hidden
                elif what == "delta-cut":
                    raw = (work / "d.vud").read_bytes()
                    p.write_bytes(raw[: max(9, len(raw) * (len(data) % 8 + 1) // 9)])
                    must_fail |= not hidden
                elif what == "link-in":
                    os.symlink(
                        "model_index.json" if p.parent == folder else "../model_index.json", p
                    )
                elif what == "link-out":
                    os.symlink(work / "m.safetensors", p)
                    must_fail |= not hidden
                elif what == "link-delta":
                    os.symlink(work / "d.vud", p)
                    must_fail |= not hidden
                elif what == "fifo":  # opening it would block: it must be refused unopened
                    os.mkfifo(p)
                    must_fail |= not hidden
                else:
                    os.symlink(work / "safe" / "transformer", p)
                    must_fail |= not hidden
            except OSError:  # a name the file system refuses (too long...): not a vpatch input
                continue
        rep = None
        if inp["report"] is not None:
            rep = work / "eval.json"
            rep.write_text(json.dumps(_VALID_REPORT if inp["report"] == "valid" else inp["report"]))
        delta = work / inp["delta"] if inp["delta"] else None
        stage = work / "stage"
        call(
            "push",
            lambda: push(folder, "me/x", delta=delta, eval_report=rep, dry_run=True, stage=stage),
            work,
            (stage,),
            tally,
            must_fail=must_fail,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ target: output paths

# as a shell passes them: any bytes but "/" and NUL, decoded the way Python decodes argv
output_names = (
    st.binary(min_size=1, max_size=200)
    .map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_"))
    .filter(lambda b: b not in (b".", b".."))
    .map(os.fsdecode)
)


def _remove(p: Path) -> None:
    try:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    except OSError:
        pass


def output_path_case(name: str, suffix: bool, tally: Tally | None = None) -> None:
    from patcher.convert import convert_pickle
    from patcher.push import push

    work = workdir("m.safetensors", "d.vud", "m.pt", "safe")
    try:
        n = name + (".safetensors" if suffix else "")
        out = work / n
        if os.path.lexists(out):
            return
        call(
            "output-apply",
            lambda: patcher.apply_delta(work / "m.safetensors", work / "d.vud", out),
            work,
            (out,),
            tally,
        )
        _remove(out)
        call(
            "output-convert",
            lambda: convert_pickle(work / "m.pt", out, trust_pickle=True),
            work,
            (out,),
            tally,
        )
        _remove(out)
        call(
            "output-push-stage",
            lambda: push(work / "safe", "me/x", dry_run=True, stage=out),
            work,
            (out,),
            tally,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
