"""Streaming merge and unmerge of a ``.vud`` delta into safetensors checkpoints.

Plan first (which tensors, which files, how much memory), then stream: untouched byte ranges are
copied in the kernel, never decoded; each edited tensor is processed in row blocks in fp32 and cast
back to its stored dtype. Every edit is "add U Vᵀ" row by row, so apply and revert share one loop
and cut tensors identically (``row_blocks``), which is what makes an exact revert possible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .._version import __version__
from ..checkpoint import Checkpoint, Component, WeightSet, load_index, open_checkpoint, provenance
from ..dtypes import Codec, codec_for, dtype_refusal
from ..erasure.refusal import lowrank_norm, projected_rows
from ..errors import (
    AlreadyApplied,
    CompatibilityError,
    DtypeError,
    NumericError,
    OutputError,
    PickleRefused,
    RevertError,
)
from ..layouts import AliasRules, Location, resolve, rules_for
from ..output import atomic_dir, atomic_file
from ..safetensors_io import (
    TORCH_DTYPES,
    Header,
    PositionalWriter,
    TensorInfo,
    TensorReader,
    copy_file,
    copy_pieces,
    pwrite_all,
    read_header,
    rewrite_metadata,
    row_blocks,
    save_tensors,
    start_writeback,
)
from ..vud.delta import Delta, DeltaEntry, read_delta

ROW_BLOCK_BYTES = 8 << 20  # fp32 bytes per row block
STAT_EVERY = 4  # the rounding report reads every 4th row block (all of them for a tensor of fewer than 8 blocks)
COPY_PIECE = 64 << 20  # progress and early-writeback granularity for raw copies
BASE_RSS = 300 << 20  # interpreter + torch, for the estimate
SURVIVAL_WARN = 0.5  # warn when the rounding error exceeds half the intended edit


class Reporter(Protocol):
    def start(self, description: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def stop(self) -> None: ...


class NullReporter:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------- planning


@dataclass
class Match:
    entry: DeltaEntry
    status: str  # matched | missing | shape | dtype | other-component
    note: str = ""
    sets: list[WeightSet] = field(default_factory=list)
    locs: list[Location] = field(default_factory=list)  # where the entry is in each of ``sets``
    dtype: str | None = None
    base_match: bool | None = None  # target bytes == the delta's base fingerprint

    def files(self) -> list[Path]:
        return [ws.key_file[loc.key] for ws, loc in zip(self.sets, self.locs)]


@dataclass
class Plan:
    checkpoint: Checkpoint
    delta: Delta
    component: str | None
    how: str  # how the component was chosen
    matches: list[Match]
    strength: float
    use_factors: bool

    @property
    def in_scope(self) -> list[Match]:
        return [m for m in self.matches if m.status != "other-component"]

    @property
    def matched(self) -> list[Match]:
        return [m for m in self.matches if m.status == "matched"]

    def edits_by_file(self) -> dict[Path, dict[str, list[tuple[Location, Match]]]]:
        """file -> stored key -> the entries that edit it (several for the row blocks of a fused tensor)."""
        out: dict[Path, dict[str, list[tuple[Location, Match]]]] = {}
        for m in self.matched:
            for ws, loc in zip(m.sets, m.locs):
                out.setdefault(ws.key_file[loc.key], {}).setdefault(loc.key, []).append((loc, m))
        return out

    def edited_bytes(self) -> int:
        tot = 0
        for f, ms in self.edits_by_file().items():
            h = self._header(f)
            for key, hits in ms.items():
                t = h.tensors[key]
                row = t.nbytes // max(1, t.shape[0])
                tot += sum(
                    row * (loc.rows[1] - loc.rows[0]) if loc.rows else t.nbytes for loc, _ in hits
                )
        return tot

    def weight_set(self, f: Path) -> WeightSet:
        for ws in self.checkpoint.weight_sets:
            if f in ws.headers:
                return ws
        raise KeyError(f)

    def _header(self, f: Path) -> Header:
        return self.weight_set(f).headers[f]

    def each_edit(self):
        """(file, stored key, location, match, codec) for every edit, the codec read once per tensor."""
        for f, ms in self.edits_by_file().items():
            for key, hits in ms.items():
                codec = codec_for(self.weight_set(f), key)
                for loc, m in hits:
                    yield f, key, loc, m, codec

    def peak_estimate(self) -> int:
        worst = 0
        for m in self.matched:
            out, inn = m.entry.shape
            block = min(out * inn * 4, max(inn * 4, ROW_BLOCK_BYTES))
            factors = (out + inn) * m.entry.rank * 4 * 2
            worst = max(worst, 5 * block + factors)
        return BASE_RSS + worst

    def coverage(self) -> dict:
        scope = self.in_scope
        return {
            "component": self.component,
            "how": self.how,
            "expected": len(scope),
            "matched": len(self.matched),
            "missing": [m.entry.key for m in scope if m.status == "missing"],
            "shape_mismatch": [f"{m.entry.key}: {m.note}" for m in scope if m.status == "shape"],
            "other_component": [m.entry.key for m in self.matches if m.status == "other-component"],
        }


def _sets_for(ck: Checkpoint, name: str | None) -> Component | None:
    if ck.layout == "pipeline":
        return next((c for c in ck.components if c.name == name), None)
    return ck.components[0]


def _score(ws: WeightSet, entries: list[DeltaEntry], rules: AliasRules) -> int:
    return sum(1 for e in entries if resolve(e.tensor_key, e.shape, ws, rules)[0] == "matched")


def _choose_component(
    ck: Checkpoint, delta: Delta, component: str | None, rules: AliasRules
) -> tuple[str | None, str]:
    names = delta.components()
    if ck.layout == "pipeline":
        return None, "pipeline folder: each entry goes to its component's subfolder"
    if component is not None:
        if component not in names:
            raise CompatibilityError(
                f"--component {component} is not in the delta (it has: {', '.join(names)})"
            )
        return component, "--component"
    ws = ck.components[0].weight_sets[0]
    scores = {n: _score(ws, [e for e in delta.entries if e.component == n], rules) for n in names}
    best = max(scores.values())
    if best == 0:
        return names[0] if len(names) == 1 else None, "no component matched any key"
    top = [n for n, s in scores.items() if s == best]
    if len(top) > 1:
        folder = ck.components[0].folder
        if folder is not None and folder.name in top:
            return (
                folder.name,
                f"keys match {', '.join(top)} equally; chose {folder.name} from the folder name",
            )
        raise CompatibilityError(
            f"the checkpoint matches components {', '.join(top)} of the delta equally ({best} keys each); pass --component NAME to say which one this file is"
        )
    n = len([e for e in delta.entries if e.component == top[0]])
    return top[0], f"inferred from keys and shapes ({best}/{n} entries of {top[0]} found)"


def _sha256_tensor(ws: WeightSet, loc: Location) -> str:
    """Fingerprint of a tensor's (or a fused tensor's row block's) stored bytes."""
    h = ws.headers[ws.key_file[loc.key]]
    t = h.tensors[loc.key]
    a, b = loc.rows or (0, t.shape[0])
    digest = hashlib.sha256()
    with TensorReader(h) as rd:
        for r0, r1 in row_blocks((b - a, *t.shape[1:]), ROW_BLOCK_BYTES):
            digest.update(rd.raw_rows(loc.key, a + r0, a + r1))
    return digest.hexdigest()


def plan_apply(
    checkpoint: str | Path | Checkpoint,
    delta: str | Path | Delta,
    *,
    component: str | None = None,
    strength: float = 1.0,
    use_factors: bool = False,
    allow_partial: bool = False,
    fingerprints: bool = True,
    revision: str | None = None,
) -> Plan:
    """Match every delta entry to a tensor; raise with a coverage report unless all are found."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint, revision)
    dl = delta if isinstance(delta, Delta) else read_delta(delta)
    if not (strength == strength) or abs(strength) > 1e6:
        raise CompatibilityError(f"--strength {strength} is not a usable number")
    rules = rules_for(dl.method.get("family") if isinstance(dl.method, dict) else None)
    chosen, how = _choose_component(ck, dl, component, rules)
    matches: list[Match] = []
    for e in dl.entries:
        if ck.layout != "pipeline" and chosen is not None and e.component != chosen:
            matches.append(Match(e, "other-component", f"entry is for {e.component}"))
            continue
        comp = _sets_for(ck, e.component)
        if comp is None or not comp.weight_sets:
            matches.append(Match(e, "missing", f"no {e.component}/ weights in the checkpoint"))
            continue
        if comp.pickle_files:
            raise PickleRefused(
                f"{comp.folder} holds pickle weights ({comp.pickle_files[0].name}) beside the safetensors ones; they would stay unpatched and could be loaded instead. Delete or convert them first"
            )
        m = Match(e, "matched")
        for ws in comp.weight_sets:
            status, loc, note = resolve(e.tensor_key, e.shape, ws, rules)
            if loc is None:
                m.status, m.note = status, note
                break
            m.sets.append(ws)
            m.locs.append(loc)
            m.dtype = ws.dtype(loc.key)
            refusal = dtype_refusal(ws, loc.key)
            if refusal:
                m.status, m.note = "dtype", f"{loc.key} in {ws.label}: {refusal}"
                break
        matches.append(m)
    taken: dict[tuple[Path, str], list[tuple[int, int, str]]] = {}
    for m in matches:
        for f, loc in zip(m.files(), m.locs):
            t_rows = loc.rows or (0, 1 << 62)
            for a, b, other in taken.get((f, loc.key), []):
                if t_rows[0] < b and a < t_rows[1]:
                    raise CompatibilityError(
                        f"{m.entry.key} and {other} both resolve to rows of {loc.key} in {f.name}; the delta or the alias rules are inconsistent"
                    )
            taken.setdefault((f, loc.key), []).append((*t_rows, m.entry.key))

    plan = Plan(ck, dl, chosen, how, matches, float(strength), use_factors)
    bad_dtype = [m for m in matches if m.status == "dtype"]
    if bad_dtype:
        raise DtypeError(
            f"{bad_dtype[0].note} ({len(bad_dtype)} targeted tensor(s) affected; nothing was written)"
        )
    cov = plan.coverage()
    if not plan.matched or (cov["matched"] < cov["expected"] and not allow_partial):
        first = (cov["missing"] + cov["shape_mismatch"])[:2]
        err = CompatibilityError(
            f"the delta does not fit this checkpoint: {cov['matched']}/{cov['expected']} entries matched"
            f" ({len(cov['missing'])} missing, {len(cov['shape_mismatch'])} wrong shape; first: {'; '.join(first)})."
            + (
                " Is this delta for another model?"
                if not plan.matched
                else " Pass --allow-partial to patch only what matches."
            )
        )
        err.plan = plan  # type: ignore[attr-defined]
        raise err
    if fingerprints:
        for m in plan.matched:
            if m.entry.base_sha256 is not None:
                m.base_match = all(
                    _sha256_tensor(ws, loc) == m.entry.base_sha256
                    for ws, loc in zip(m.sets, m.locs)
                )
    return plan


# --------------------------------------------------------------------------- the row loop


@dataclass
class TensorStats:
    key: str  # stored key
    file: str
    dtype: str
    rows: int
    cols: int
    entry: str = ""  # the delta entry (diffusers key) behind this edit
    row_range: list[int] | None = None  # [a, b) within a fused tensor
    saturated: int = 0  # fp8: values clamped to the format's range
    intended_norm: float = 0.0
    rounding_error: float = 0.0  # ‖effective - intended‖ / ‖intended‖
    changed_fraction: float = 0.0
    base_match: bool | None = None
    sha256_in: str = ""
    sha256_out: str = ""
    exact: bool | None = None  # revert only: output bytes match the original fingerprint


@dataclass
class Op:
    """``W <- W + coef * U Vᵀ`` with U given, or U = -(W V) from the target's own rows (``project``)."""

    V: torch.Tensor
    coef: float
    U: torch.Tensor | None = None  # None: projection recomputed from the target
    P: torch.Tensor | None = None  # map_input: U = W P recomputed from the target's own rows
    collect_revert: bool = False
    fix_index: torch.Tensor | None = None  # revert: positions to restore, flat, sorted
    fix_value: torch.Tensor | None = None
    fingerprint: str | None = None  # expected sha256 of the input tensor (the delta's base)
    hash: bool = False  # sha256 of the bytes read and written (revert records, revert checks)
    rows: tuple[int, int] | None = None  # row block of a fused tensor; None: all rows
    codec: Codec | None = (
        None  # stored dtype <-> fp32 (fp8: with the stored scale); None: a plain cast
    )
    entry: str = ""
    # filled by the loop
    applied_U: list[torch.Tensor] = field(default_factory=list)
    fixes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction instead of a boolean mask: min and max are finite iff every value is (NaN propagates)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _edit_rows(
    W: torch.Tensor, r0: int, r1: int, op: Op, st: TensorStats, sums: dict, stats: bool = True
) -> torch.Tensor:
    """One row block: new = W + U_rows Vᵀ in fp32, cast back; accumulate the rounding report.

    With ``stats`` False (blocks outside the rounding sample of a large tensor) only the NaN/Inf
    guard runs on the block; the intended norm is always exact (it is computed from the factors).
    fp8 rows are decoded with their scale first and re-encoded with the same scale."""
    codec = op.codec or Codec(W.dtype)
    ra, rb = _abs_rows(op, r0, r1)
    new = codec.decode(W, ra, rb)
    if op.P is not None:
        U_rows = op.coef * (new @ op.P)
    else:
        U_rows = projected_rows(new, op.V, op.coef) if op.U is None else op.coef * op.U[r0:r1]
    new.addmm_(U_rows, op.V.T)
    out, over = codec.encode(new, ra, rb)
    st.saturated += over
    d2 = lowrank_norm(U_rows, op.V) ** 2
    sums["d2"] += d2
    if not stats and op.fix_index is None and not op.collect_revert:
        guarded = (
            new if codec.saturates else out
        )  # a saturating encode hides overflow: look before it
        if not _all_finite(guarded):
            bad = int((~torch.isfinite(guarded)).sum())
            raise NumericError(
                f"editing {st.key} produced {bad} NaN/Inf values (rows {r0}-{r1}); nothing was written. Check the delta and the --strength"
            )
        return out
    sums["rows"] += r1 - r0
    if op.fix_index is not None and op.fix_index.numel():
        lo, hi = r0 * W.shape[1], r1 * W.shape[1]
        sel = (op.fix_index >= lo) & (op.fix_index < hi)
        if sel.any():
            _bits(out).view(-1)[op.fix_index[sel] - lo] = _bits(op.fix_value[sel])
    decoded = codec.decode(out, ra, rb)
    if codec.saturates and not _all_finite(new):
        decoded.fill_(float("nan"))  # the encode clamps; an overflow must still stop the run below
    err = decoded.sub_(new).view(-1)  # what rounding to the stored dtype took off the edit
    e2 = float(torch.dot(err, err))
    if not math.isfinite(e2):  # any NaN/Inf in new or out (incl. overflow in the cast) lands here
        bad = int((~torch.isfinite(out)).sum()) or int((~torch.isfinite(new)).sum())
        raise NumericError(
            f"editing {st.key} produced {bad} NaN/Inf values (rows {r0}-{r1}); nothing was written. Check the delta and the --strength"
        )
    sums["e2"] += e2
    sums["d2s"] += d2
    sums["changed"] += int(torch.count_nonzero(_bits(out) != _bits(W)))
    if op.collect_revert:
        # predict the revert exactly as revert_delta will compute it, and keep what it would miss
        op.applied_U.append(U_rows.clone())
        back = codec.encode(codec.decode(out, ra, rb).addmm_(-1.0 * U_rows, op.V.T), ra, rb)[0]
        miss = (_bits(back) != _bits(W)).reshape(-1).nonzero().reshape(-1)
        if miss.numel():
            op.fixes.append((miss + r0 * W.shape[1], W.reshape(-1)[miss].clone()))
    return out


@contextmanager
def _edit_threads(n: int | None):
    """Cap torch's intra-op threads while the copier runs: on a small machine torch's pool would take
    every core and starve the kernel copy, which is most of the bytes."""
    before = torch.get_num_threads()
    if n is not None and before > n and (os.cpu_count() or 1) <= 4:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _abs_rows(op: Op, r0: int, r1: int) -> tuple[int, int]:
    """Rows of a block relative to the op's range, as rows of the whole stored tensor (for per-row scales)."""
    a = op.rows[0] if op.rows else 0
    return a + r0, a + r1


def _untouched(t: TensorInfo, ops: list[Op] | None) -> list[tuple[int, int]]:
    """Byte ranges of ``t`` (relative to the data buffer) that no op edits."""
    if not ops:
        return [(t.begin, t.end)]
    row = t.nbytes // max(1, t.shape[0])
    out, pos = [], 0
    for a, b in sorted(op.rows or (0, t.shape[0]) for op in ops):
        if a > pos:
            out.append((t.begin + pos * row, t.begin + a * row))
        pos = max(pos, b)
    if pos < t.shape[0]:
        out.append((t.begin + pos * row, t.end))
    return out


def _patch_file(
    src: Header, dst: Path, ops: dict[str, list[Op]], meta: dict[str, str], rep: Reporter
) -> list[TensorStats]:
    """Write ``dst`` = ``src`` with ``ops`` applied. Untouched byte ranges (whole tensors, or the
    other row blocks of a fused one) are copied by the kernel on a second thread while this one
    computes the edited rows; both write at fixed offsets."""
    stats: list[TensorStats] = []
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        pw = PositionalWriter(
            fd,
            [(t.name, t.dtype, t.shape) for t in src.tensors.values()],
            meta,
            like=src.data_start,
        )
        shift = pw.header_len - src.data_start  # dst offset = src offset + shift
        ranges: list[list[int]] = []  # [src offset, dst offset, length] of untouched runs
        for t in src.tensors.values():
            for b0, b1 in _untouched(t, ops.get(t.name)):
                a = src.data_start + b0
                if ranges and ranges[-1][0] + ranges[-1][2] == a:
                    ranges[-1][2] += b1 - b0
                elif b1 > b0:
                    ranges.append([a, a + shift, b1 - b0])
        stop = threading.Event()

        with TensorReader(src) as rd:

            def copier() -> None:
                for a, d, n in ranges:
                    copy_pieces(rd.fd, a, fd, d, n, COPY_PIECE, rep.advance, stop)

            with ThreadPoolExecutor(1) as pool, _edit_threads(1 if ranges else None):
                copying = pool.submit(
                    copier
                )  # the kernel copy gets a core of its own; the edit the other
                try:
                    for name, key_ops in ops.items():
                        for op in key_ops:
                            stats.append(
                                _edit_tensor(rd, src.tensors[name], pw.offset(name), fd, op, rep)
                            )
                except BaseException:
                    stop.set()
                    raise
                copying.result()
        pw.finish()
    finally:
        os.close(fd)
    return stats


def _edit_tensor(
    rd: TensorReader, t: TensorInfo, dst_off: int, fd: int, op: Op, rep: Reporter
) -> TensorStats:
    """Edit rows ``op.rows`` (all rows by default) of ``t``; block row numbers are relative to them."""
    a, b = op.rows or (0, t.shape[0])
    st = TensorStats(
        t.name,
        str(rd.header.path),
        t.dtype,
        b - a,
        t.shape[1],
        op.entry,
        [a, b] if op.rows else None,
    )
    sums = {"d2": 0.0, "d2s": 0.0, "e2": 0.0, "changed": 0, "rows": 0}
    h_in = hashlib.sha256() if (op.hash or op.fingerprint is not None) else None
    h_out = hashlib.sha256() if op.hash else None
    blocks = row_blocks((b - a, *t.shape[1:]), ROW_BLOCK_BYTES)
    stride = (
        1 if len(blocks) < 2 * STAT_EVERY else STAT_EVERY
    )  # the rounding report reads a systematic sample of blocks
    row = t.nbytes // max(1, t.shape[0])
    for i, (r0, r1) in enumerate(blocks):
        W = rd.rows(t.name, a + r0, a + r1)
        out = _edit_rows(W, r0, r1, op, st, sums, stats=i % stride == 0)
        data = memoryview(_bits(out).numpy()).cast("B")
        if h_in is not None:
            h_in.update(memoryview(_bits(W).numpy()).cast("B"))
        if h_out is not None:
            h_out.update(data)
        pwrite_all(fd, data, dst_off + (a + r0) * row)
        rep.advance(len(data))
    start_writeback(fd, dst_off + a * row, (b - a) * row)
    st.intended_norm = sums["d2"] ** 0.5
    st.rounding_error = (sums["e2"] / sums["d2s"]) ** 0.5 if sums["d2s"] > 0 else 0.0
    st.changed_fraction = sums["changed"] / max(1, sums["rows"] * (t.numel // max(1, t.shape[0])))
    if h_in is not None:
        st.sha256_in = h_in.hexdigest()
    if h_out is not None:
        st.sha256_out = h_out.hexdigest()
    if op.fingerprint is not None:
        st.base_match = st.sha256_in == op.fingerprint
    return st


def _validate_copy(src: Header, dst: Path) -> None:
    """Re-open what was written: same tensors, dtypes, shapes and offsets as the source."""
    out = read_header(dst)
    a = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in src.tensors.values()]
    b = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in out.tensors.values()]
    if a != b:
        raise OutputError(
            f"validation of {dst} failed: its tensor table differs from the input's; nothing was kept"
        )


# --------------------------------------------------------------------------- reports


@dataclass
class Report:
    action: str  # apply | revert | dry-run
    checkpoint: str
    delta: str
    delta_sha256: str
    concept: str
    output: str | None
    strength: float
    mode: str
    coverage: dict
    bytes_total: int
    bytes_edited: int
    peak_estimate: int
    tensors: list[TensorStats] = field(default_factory=list)
    planned: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    revert_record: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _report(action: str, plan: Plan, out: Path | None) -> Report:
    ck = plan.checkpoint
    planned = [
        {
            "key": m.entry.key,
            "kind": m.entry.kind,
            "rank": m.entry.rank,
            "dtype": m.dtype,
            "files": [str(f) for f in m.files()],
            "stored": [loc.label() for loc in m.locs],
            "resolved": sorted({loc.how for loc in m.locs}),
            "fingerprint": {True: "base", False: "differs", None: "unknown"}[m.base_match],
        }
        for m in plan.matched
    ]
    return Report(
        action,
        str(ck.root),
        str(plan.delta.path),
        plan.delta.sha256,
        plan.delta.concept_name,
        str(out) if out else None,
        plan.strength,
        "factors" if plan.use_factors else "recompute",
        plan.coverage(),
        ck.total_bytes(),
        plan.edited_bytes(),
        plan.peak_estimate(),
        planned=planned,
    )


# --------------------------------------------------------------------------- writing outputs


def _resolve_out(ck: Checkpoint, out: Path) -> Path:
    if ck.layout == "file" and out.is_dir():
        return out / ck.root.name
    return out


def _write_checkpoint(
    plan: Plan,
    out: Path,
    ops_by_file: dict[Path, dict[str, list[Op]]],
    meta_for,
    index_meta,
    rep: Reporter,
    overwrite: bool,
    after_write=None,
) -> list[TensorStats]:
    """Write the whole output (file or folder) atomically.

    ``meta_for(header, stats)`` gives a patched file's metadata: first with ``stats=None`` to reserve
    the header (worst case), then with every tensor's stats once all files are streamed, when what
    the provenance says (e.g. which targets differed from the base) is known. Index files are
    written last, with ``index_meta(metadata, stats)``.
    """
    ck = plan.checkpoint
    stats: list[TensorStats] = []
    patched: list[tuple[Header, Path]] = []
    inputs = [ck.root] + [f for ws in ck.weight_sets for f in ws.files]

    def patch(src: Path, dst: Path) -> None:
        h = plan._header(src)
        stats.extend(_patch_file(h, dst, ops_by_file[src], meta_for(h, None), rep))
        patched.append((h, dst))

    def finalize() -> None:
        for h, dst in patched:
            rewrite_metadata(dst, meta_for(h, stats))
            _validate_copy(h, dst)

    rep.start("writing", ck.total_bytes())
    try:
        if ck.layout == "file":
            with atomic_file(out, inputs, overwrite) as tmp:
                patch(ck.root, tmp)
                finalize()
                if after_write:
                    after_write(stats)
            return stats
        root = ck.root.parent if ck.layout == "sharded" else ck.root
        index_files = {ws.index: ws for ws in ck.weight_sets if ws.index is not None}
        if ck.layout == "sharded":
            sources = [ck.root] + ck.weight_sets[0].files
        else:
            sources = [Path(dp) / f for dp, dns, fns in os.walk(root) for f in sorted(fns)]
        with atomic_dir(out, inputs, overwrite) as tmp:
            rewrite_index: list[Path] = []
            for src in sources:
                rel = src.relative_to(root)
                if any(".vpatch-tmp" in part or ".vpatch-old-" in part for part in rel.parts):
                    continue  # leftovers of our own interrupted runs
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src in ops_by_file:
                    patch(src, dst)
                elif src in index_files and any(f in ops_by_file for f in index_files[src].files):
                    rewrite_index.append(src)
                else:
                    copy_file(
                        src, dst, COPY_PIECE, rep.advance if src.suffix == ".safetensors" else None
                    )
            finalize()
            for src in rewrite_index:
                obj = dict(index_files[src].index_json or {})
                obj["metadata"] = index_meta(dict(obj.get("metadata") or {}), stats)
                (tmp / src.relative_to(root)).write_text(
                    json.dumps(obj, indent=2) + "\n", encoding="utf-8"
                )
            for idx in index_files:  # every index must resolve in the new folder
                new = tmp / idx.relative_to(root)
                if new.exists():
                    load_index(new)
            if after_write:
                after_write(stats)
        return stats
    finally:
        rep.stop()


def _with_record(meta: dict[str, str], records: list[dict]) -> dict[str, str]:
    m = dict(meta)
    if records:
        m["vpatch.applied"] = json.dumps(records, separators=(",", ":"))
    else:
        m.pop("vpatch.applied", None)
    return m


def _warn_rounding(stats: list[TensorStats]) -> list[str]:
    return [
        f"{s.key} ({s.file}): only {max(0.0, 1 - s.rounding_error):.0%} of the edit survived rounding to {s.dtype}"
        f" ({s.changed_fraction:.1%} of elements changed); the edit is below this dtype's resolution, try a higher --strength or an fp32 checkpoint"
        for s in stats
        if s.rounding_error > SURVIVAL_WARN
    ]


def apply_delta(
    checkpoint: str | Path,
    delta: str | Path | Delta,
    out: str | Path | None = None,
    *,
    strength: float = 1.0,
    component: str | None = None,
    use_factors: bool = False,
    allow_partial: bool = False,
    force: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    revert_record: str | Path | None = None,
    reporter: Reporter | None = None,
    revision: str | None = None,
) -> Report:
    """Merge ``delta`` into ``checkpoint`` and write the result to ``out``.

    ``strength`` multiplies each entry's default strength (1.0 = as probed). ``project_input`` entries
    recompute U from the target's own weight unless ``use_factors``; ``add`` entries add U Vᵀ.
    ``revert_record`` (optional, keep it private) stores what makes ``revert_delta`` bit-exact.
    ``checkpoint`` may be a hub id (``owner/name``, or ``owner/name:path`` for one file or component
    folder), fetched through the hub cache at ``revision``.
    """
    rep = reporter or NullReporter()
    plan = plan_apply(
        checkpoint,
        delta,
        component=component,
        strength=strength,
        use_factors=use_factors,
        allow_partial=allow_partial,
        fingerprints=dry_run,
        revision=revision,
    )  # a real run checks them while streaming
    dl = plan.delta
    if not force:
        for m in plan.matched:
            for ws in m.sets:
                if any(r.get("delta_sha256") == dl.sha256 for r in ws.metadata_records()):
                    raise AlreadyApplied(
                        f"{ws.label} already contains delta {dl.sha256[:12]} ({dl.concept_name}); applying it twice compounds the edit. Pass --force to do it anyway"
                    )
    if dry_run:
        rep_ = _report("dry-run", plan, Path(out) if out else None)
        rep_.warnings += [
            f"{m.entry.key}: target differs from the probed base (fine-tune?)"
            for m in plan.matched
            if m.base_match is False
        ]
        return rep_
    if out is None:
        raise OutputError("no output given; pass -o OUT (vpatch never overwrites its input)")
    out = _resolve_out(plan.checkpoint, Path(out))
    record_path = Path(revert_record) if revert_record else None

    ops_by_file: dict[Path, dict[str, list[Op]]] = {}
    for f, key, loc, m, codec in plan.each_edit():
        e = m.entry
        project = e.kind in ("project_input", "map_input") and not use_factors
        ops_by_file.setdefault(f, {}).setdefault(key, []).append(
            Op(
                e.V,
                e.strength * strength if project else strength,
                None if project else e.U,
                P=e.P if project else None,
                collect_revert=record_path is not None,
                fingerprint=e.base_sha256,
                hash=record_path is not None,
                rows=loc.rows,
                codec=codec,
                entry=e.key,
            )
        )
    every_tag = sorted(
        _tag(plan.checkpoint, f, k, op.rows)
        for f, ops in ops_by_file.items()
        for k, kops in ops.items()
        for op in kops
    )

    def rec(stats: list[TensorStats] | None) -> dict:
        diverged = (
            every_tag
            if stats is None
            else sorted(_stat_tag(plan, s) for s in stats if s.base_match is False)
        )
        return {
            "delta_sha256": dl.sha256,
            "concept": dl.concept_name,
            "strength": strength,
            "mode": "factors" if use_factors else "recompute",
            "entries": len(plan.matched),
            "vpatch": __version__,
            "diverged": diverged,
        }

    def meta_for(h: Header, stats: list[TensorStats] | None) -> dict[str, str]:
        return _with_record(h.metadata, provenance(h.metadata) + [rec(stats)])

    def index_meta(meta: dict, stats: list[TensorStats]) -> dict:
        meta["vpatch.applied"] = list(meta.get("vpatch.applied") or []) + [rec(stats)]
        return meta

    def write_record(stats: list[TensorStats]) -> None:
        if record_path is not None:
            _write_revert_record(record_path, plan, ops_by_file, stats, dl.sha256, overwrite)

    stats = _write_checkpoint(
        plan, out, ops_by_file, meta_for, index_meta, rep, overwrite, write_record
    )
    for m in plan.matched:
        seen = [s.base_match for s in stats if s.entry == m.entry.key and Path(s.file) in m.files()]
        m.base_match = None if not seen or None in seen else all(seen)
    report = _report("apply", plan, out)
    report.tensors = stats
    report.revert_record = str(record_path) if record_path else None
    report.warnings += _warn_rounding(stats)
    report.warnings += [
        f"{s.key}: {s.saturated} value(s) exceeded the {s.dtype} range after the edit and were clamped to its largest value"
        for s in stats
        if s.saturated
    ]
    report.warnings += [
        f"{m.entry.key}: target differs from the probed base"
        + (
            f" (stored as {m.dtype}, probed from {m.entry.base_dtype})"
            if m.entry.base_dtype not in (None, m.dtype)
            else ""
        )
        + "; "
        + (
            "U was recomputed from the target's own weight"
            if m.entry.kind in ("project_input", "map_input") and not use_factors
            else "the base's factors were added as they are"
        )
        for m in plan.matched
        if m.base_match is False
    ]
    if len(plan.matched) < len(plan.in_scope):
        report.warnings.append(
            f"partial: {len(plan.matched)}/{len(plan.in_scope)} entries applied (--allow-partial)"
        )
    return report


# --------------------------------------------------------------------------- revert


RECORD_FORMAT = "vud-revert"


def _tag(ck: Checkpoint, f: Path, key: str, rows: tuple[int, int] | list[int] | None = None) -> str:
    """Name of an edit in a revert record: stable across -o renames of a single file; a fused
    tensor's row block carries its rows."""
    name = key if rows is None else f"{key}[{rows[0]}:{rows[1]}]"
    if ck.layout == "file":
        return name
    root = ck.root.parent if ck.layout == "sharded" else ck.root
    return f"{f.relative_to(root).as_posix()}::{name}"


def _stat_tag(plan: Plan, s: TensorStats) -> str:
    return _tag(plan.checkpoint, Path(s.file), s.key, s.row_range)


def _write_revert_record(
    path: Path,
    plan: Plan,
    ops_by_file: dict[Path, dict[str, list[Op]]],
    stats: list[TensorStats],
    delta_sha: str,
    overwrite: bool,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    originals: dict[str, str] = {}
    by_tag = {_stat_tag(plan, s): s for s in stats}
    for f, ops in ops_by_file.items():
        for key, key_ops in ops.items():
            for op in key_ops:
                name = _tag(plan.checkpoint, f, key, op.rows)
                tensors[f"{name}::U"] = (
                    torch.cat(op.applied_U) if op.applied_U else torch.zeros(0, op.V.shape[1])
                )
                idx = (
                    torch.cat([i for i, _ in op.fixes])
                    if op.fixes
                    else torch.zeros(0, dtype=torch.int64)
                )
                dt = TORCH_DTYPES[plan._header(f).tensors[key].dtype]
                val = torch.cat([v for _, v in op.fixes]) if op.fixes else torch.zeros(0, dtype=dt)
                tensors[f"{name}::fix_index"], tensors[f"{name}::fix_value"] = (
                    idx.to(torch.int64),
                    val,
                )
                originals[name] = by_tag[name].sha256_in
    meta = {
        "vpatch.format": RECORD_FORMAT,
        "vpatch.delta_sha256": delta_sha,
        "vpatch.originals": json.dumps(originals),
    }
    with atomic_file(path, [], overwrite) as tmp:
        save_tensors(tmp, tensors, meta)
        read_header(tmp)


def _read_revert_record(path: Path, delta_sha: str) -> tuple[dict[str, str], Header]:
    h = read_header(path)
    if h.metadata.get("vpatch.format") != RECORD_FORMAT:
        raise RevertError(f"{path} is not a vpatch revert record")
    if h.metadata.get("vpatch.delta_sha256") != delta_sha:
        raise RevertError(
            f"{path} belongs to another delta ({h.metadata.get('vpatch.delta_sha256', '?')[:12]}), not {delta_sha[:12]}"
        )
    try:
        originals = json.loads(h.metadata.get("vpatch.originals", ""))
    except ValueError:
        raise RevertError(f"{path}: damaged revert record (vpatch.originals)") from None
    return originals, h


def _inverse_map(e: DeltaEntry, lam: float) -> torch.Tensor:
    """P' with (I + λ P Vᵀ)⁻¹ = I + P' Vᵀ (Woodbury): P' = −λ P (I + λ VᵀP)⁻¹."""
    P, V = e.P.double(), e.V.double()
    K = torch.eye(P.shape[1], dtype=torch.float64) + lam * (V.T @ P)
    if float(torch.linalg.svdvals(K).min()) < 1e-6:
        raise RevertError(
            f"{e.key}: this input-side map sends some inputs to zero, so on a checkpoint other than the probed base it cannot be undone; revert needs the revert record written by apply --revert-record"
        )
    return (-lam * P @ torch.linalg.inv(K)).float()


def revert_delta(
    checkpoint: str | Path,
    delta: str | Path | Delta,
    out: str | Path,
    *,
    component: str | None = None,
    record: str | Path | None = None,
    allow_inexact: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> Report:
    """Undo an ``apply``: bit-exact with its revert record; otherwise the inverse edit, verified
    against the delta's base fingerprints (rounding usually leaves a few elements off)."""
    rep = reporter or NullReporter()
    dl = delta if isinstance(delta, Delta) else read_delta(delta)
    plan = plan_apply(checkpoint, dl, component=component, allow_partial=True, fingerprints=False)
    recs = [
        r
        for m in plan.matched
        for ws in m.sets
        for r in ws.metadata_records()
        if r.get("delta_sha256") == dl.sha256
    ]
    if not recs:
        raise RevertError(
            f"{plan.checkpoint.root} has no record of delta {dl.sha256[:12]} ({dl.concept_name}); nothing to revert"
        )
    applied = recs[0]
    strength = float(applied.get("strength", 1.0))
    mode = applied.get("mode", "recompute")
    diverged = set(applied.get("diverged") or [])
    originals: dict[str, str] = {}
    rec_header = None
    if record is not None:
        originals, rec_header = _read_revert_record(Path(record), dl.sha256)

    ops_by_file: dict[Path, dict[str, list[Op]]] = {}
    expect: dict[str, str | None] = {}  # tag -> the sha256 the reverted bytes must have
    rd = TensorReader(rec_header) if rec_header else None
    try:
        for f, key, loc, m, codec in plan.each_edit():
            e = m.entry
            name = _tag(plan.checkpoint, f, key, loc.rows)
            if rd is not None and f"{name}::U" in rec_header.tensors:
                op = Op(
                    e.V,
                    -1.0,
                    rd.tensor(f"{name}::U"),
                    fix_index=rd.tensor(f"{name}::fix_index"),
                    fix_value=rd.tensor(f"{name}::fix_value"),
                    hash=True,
                )
                expect[name] = originals.get(name)
            elif e.kind == "project_input" and mode == "recompute" and name in diverged:
                lam = e.strength * strength
                if abs(lam - 1.0) < 1e-6:
                    raise RevertError(
                        f"{e.key}: a λ=1 projection on a checkpoint other than the probed base removed that component for good; revert needs the revert record written by apply --revert-record"
                    )
                op = Op(e.V, lam / (lam - 1.0), None, hash=True)  # W = W'(I - μ BBᵀ), μ = λ/(λ-1)
                expect[name] = None
            elif e.kind == "map_input" and mode == "recompute" and name in diverged:
                op = Op(e.V, 1.0, None, P=_inverse_map(e, e.strength * strength), hash=True)
                expect[name] = None
            else:
                op = Op(e.V, -strength, e.U, hash=True)
                expect[name] = e.base_sha256 if e.base_dtype in (None, m.dtype) else None
            op.rows, op.codec, op.entry = loc.rows, codec, e.key
            ops_by_file.setdefault(f, {}).setdefault(key, []).append(op)
    finally:
        if rd is not None:
            rd.close()

    def meta_for(h: Header, _stats: object) -> dict[str, str]:
        return _with_record(
            h.metadata, [r for r in provenance(h.metadata) if r.get("delta_sha256") != dl.sha256]
        )

    def index_meta(meta: dict, _stats: object) -> dict:
        meta["vpatch.applied"] = [
            r for r in meta.get("vpatch.applied") or [] if r.get("delta_sha256") != dl.sha256
        ]
        if not meta["vpatch.applied"]:
            del meta["vpatch.applied"]
        return meta

    def verify(stats: list[TensorStats]) -> None:
        for s in stats:
            want = expect.get(_stat_tag(plan, s))
            s.exact = None if want is None else s.sha256_out == want
        bad = [s for s in stats if s.exact is False]
        if bad and not allow_inexact:
            raise RevertError(
                f"{len(bad)} tensor(s) (first: {bad[0].key}) do not match the original fingerprint after revert: rounding in {bad[0].dtype} left some elements off."
                " Revert with the record from `apply --revert-record`, or pass --allow-inexact to keep the approximate result"
            )

    out = _resolve_out(plan.checkpoint, Path(out))
    stats = _write_checkpoint(plan, out, ops_by_file, meta_for, index_meta, rep, overwrite, verify)
    report = _report("revert", plan, out)
    report.strength, report.mode = strength, mode
    report.tensors = stats
    report.warnings += [
        f"{s.key}: reverted approximately (fingerprint differs)" for s in stats if s.exact is False
    ]
    report.warnings += [
        f"{s.key}: no fingerprint to verify against" for s in stats if s.exact is None
    ]
    return report
