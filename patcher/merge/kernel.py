"""The streaming kernel: write a safetensors file with edit operations applied.

Untouched byte ranges are copied in the kernel (``copy_file_range``), never decoded, on a second
thread while this one computes the edited rows; both write at fixed offsets. Each edited tensor is
processed in row blocks in fp32 and cast back to its stored dtype. Every edit is "add U Vᵀ" row by
row, so apply and revert share this loop and cut tensors identically (``row_blocks``), which is
what makes an exact revert possible.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..erasure.refusal import lowrank_norm, projected_rows
from ..errors import NumericError, OutputError
from ..progress import Reporter
from ..safetensors_io import (
    TORCH_DTYPES,
    Header,
    PositionalWriter,
    TensorInfo,
    TensorReader,
    copy_pieces,
    pwrite_all,
    read_header,
    row_blocks,
    start_writeback,
)
from .ops import Captured, EditOp, EditResult, EditStats, Restore

ROW_BLOCK_BYTES = 8 << 20  # fp32 bytes per row block
STAT_EVERY = 4  # the rounding report reads every 4th row block (all of them for a tensor of fewer than 8 blocks)
COPY_PIECE = 64 << 20  # progress and early-writeback granularity for raw copies


@dataclass(frozen=True, eq=False)
class Job:
    """One op as the kernel runs it: the planned edit, and for an exact revert what to put back."""

    op: EditOp
    restore: Restore | None = None


@dataclass
class _Tally:
    """Running sums over the row blocks of one edit (turned into an ``EditStats`` at the end)."""

    d2: float = 0.0  # ‖intended edit‖², every block (exact, from the factors)
    d2s: float = 0.0  # the same over the sampled blocks
    e2: float = 0.0  # ‖rounding error‖² over the sampled blocks
    changed: int = 0
    rows: int = 0  # rows in the sampled blocks
    saturated: int = 0
    added_U: list[torch.Tensor] = field(default_factory=list)
    miss_index: list[torch.Tensor] = field(default_factory=list)
    miss_value: list[torch.Tensor] = field(default_factory=list)


def all_finite(t: torch.Tensor) -> bool:
    """One reduction instead of a boolean mask: min and max are finite iff every value is (NaN propagates)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _nan_error(key: str, bad: int, r0: int, r1: int, before: torch.Tensor) -> NumericError:
    """BEFORE: the rows as stored, decoded: NaN/Inf there is the checkpoint's, not the edit's."""
    if not all_finite(before):
        n = int((~torch.isfinite(before)).sum())
        return NumericError(
            f"{key} already holds {n} NaN/Inf values in rows {r0}-{r1} of the input; the checkpoint"
            " is damaged, not the delta. Nothing was written"
        )
    return NumericError(
        f"editing {key} produced {bad} NaN/Inf values (rows {r0}-{r1}); nothing was written. Check the delta and the --strength"
    )


def _edit_rows(
    W: torch.Tensor,
    r0: int,
    r1: int,
    op: EditOp,
    restore: Restore | None,
    tally: _Tally,
    sample: bool = True,
    capture: bool = False,
) -> torch.Tensor:
    """One row block: new = W + U_rows Vᵀ in fp32, cast back; accumulate the rounding report.

    With ``sample`` False (blocks outside the rounding sample of a large tensor) only the NaN/Inf
    guard runs on the block; the intended norm is always exact (it is computed from the factors).
    fp8 rows are decoded with their scale first and re-encoded with the same scale."""
    codec = op.codec
    a = op.rows[0] if op.rows else 0
    ra, rb = a + r0, a + r1  # rows of the whole stored tensor (per-row fp8 scales)
    new = codec.decode(W, ra, rb)
    if op.recompute and op.P is not None:  # map_input: U = λ W P from these very rows
        U_rows = op.strength * (new @ op.P)
    elif op.recompute:
        U_rows = projected_rows(new, op.V, op.strength)
    else:
        U_rows = op.strength * op.U[r0:r1]
    new.addmm_(U_rows, op.V.T)
    out, over = codec.encode(new, ra, rb)
    tally.saturated += over
    d2 = lowrank_norm(U_rows, op.V) ** 2
    tally.d2 += d2
    if not sample and restore is None and not capture:
        guarded = (
            new if codec.saturates else out
        )  # a saturating encode hides overflow: look before it
        if not all_finite(guarded):
            bad = int((~torch.isfinite(guarded)).sum())
            raise _nan_error(op.key, bad, r0, r1, codec.decode(W, ra, rb))
        return out
    tally.rows += r1 - r0
    if restore is not None and restore.index.numel():
        lo, hi = r0 * W.shape[1], r1 * W.shape[1]
        sel = (restore.index >= lo) & (restore.index < hi)
        if sel.any():
            _bits(out).view(-1)[restore.index[sel] - lo] = _bits(restore.value[sel])
    decoded = codec.decode(out, ra, rb)
    if codec.saturates and not all_finite(new):
        decoded.fill_(float("nan"))  # the encode clamps; an overflow must still stop the run below
    err = decoded.sub_(new).view(-1)  # what rounding to the stored dtype took off the edit
    e2 = float(torch.dot(err, err))
    if not math.isfinite(e2):  # any NaN/Inf in new or out (incl. overflow in the cast) lands here
        bad = int((~torch.isfinite(out)).sum()) or int((~torch.isfinite(new)).sum())
        raise _nan_error(op.key, bad, r0, r1, codec.decode(W, ra, rb))
    tally.e2 += e2
    tally.d2s += d2
    tally.changed += int(torch.count_nonzero(_bits(out) != _bits(W)))
    if capture:
        # predict the revert exactly as revert_delta will compute it, and keep what it would miss
        tally.added_U.append(U_rows.clone())
        back = codec.encode(codec.decode(out, ra, rb).addmm_(-1.0 * U_rows, op.V.T), ra, rb)[0]
        miss = (_bits(back) != _bits(W)).reshape(-1).nonzero().reshape(-1)
        if miss.numel():
            tally.miss_index.append(miss + r0 * W.shape[1])
            tally.miss_value.append(W.reshape(-1)[miss].clone())
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


def _untouched(t: TensorInfo, jobs: list[Job] | None) -> list[tuple[int, int]]:
    """Byte ranges of ``t`` (relative to the data buffer) that no op edits."""
    if not jobs:
        return [(t.begin, t.end)]
    row = t.nbytes // max(1, t.shape[0])
    out, pos = [], 0
    for a, b in sorted(j.op.rows or (0, t.shape[0]) for j in jobs):
        if a > pos:
            out.append((t.begin + pos * row, t.begin + a * row))
        pos = max(pos, b)
    if pos < t.shape[0]:
        out.append((t.begin + pos * row, t.end))
    return out


def patch_file(
    src: Header,
    dst: Path,
    jobs: dict[str, list[Job]],
    meta: dict[str, str],
    rep: Reporter,
    *,
    hash_bytes: bool = False,
    capture: bool = False,
) -> list[EditResult]:
    """Write ``dst`` = ``src`` with ``jobs`` (stored key -> its edits) applied.

    ``hash_bytes``: sha256 of the rows read and written (revert records, revert checks);
    ``capture``: keep what an exact revert needs (``apply --revert-record``)."""
    results: list[EditResult] = []
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
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
            for b0, b1 in _untouched(t, jobs.get(t.name)):
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
                # the kernel copy gets a core of its own; the edit the other
                copying = pool.submit(copier)
                try:
                    for name, key_jobs in jobs.items():
                        for job in key_jobs:
                            results.append(
                                _edit_tensor(
                                    rd,
                                    src.tensors[name],
                                    pw.offset(name),
                                    fd,
                                    job,
                                    rep,
                                    hash_bytes,
                                    capture,
                                )
                            )
                except BaseException:
                    stop.set()
                    raise
                copying.result()
        pw.finish()
    finally:
        os.close(fd)
    return results


def _edit_tensor(
    rd: TensorReader,
    t: TensorInfo,
    dst_off: int,
    fd: int,
    job: Job,
    rep: Reporter,
    hash_bytes: bool,
    capture: bool,
) -> EditResult:
    """Edit rows ``op.rows`` (all rows by default) of ``t``; block row numbers are relative to them."""
    op = job.op
    a, b = op.rows or (0, t.shape[0])
    tally = _Tally()
    h_in = hashlib.sha256() if (hash_bytes or op.base_sha256 is not None) else None
    h_out = hashlib.sha256() if hash_bytes else None
    blocks = row_blocks((b - a, *t.shape[1:]), ROW_BLOCK_BYTES)
    # the rounding report reads a systematic sample of blocks
    stride = 1 if len(blocks) < 2 * STAT_EVERY else STAT_EVERY
    row = t.nbytes // max(1, t.shape[0])
    for i, (r0, r1) in enumerate(blocks):
        W = rd.rows(t.name, a + r0, a + r1)
        out = _edit_rows(W, r0, r1, op, job.restore, tally, i % stride == 0, capture)
        data = memoryview(_bits(out).numpy()).cast("B")
        if h_in is not None:
            h_in.update(memoryview(_bits(W).numpy()).cast("B"))
        if h_out is not None:
            h_out.update(data)
        pwrite_all(fd, data, dst_off + (a + r0) * row)
        rep.advance(len(data))
    start_writeback(fd, dst_off + a * row, (b - a) * row)
    sha_in = h_in.hexdigest() if h_in is not None else ""
    stats = EditStats(
        key=t.name,
        file=str(rd.header.path),
        dtype=t.dtype,
        rows=b - a,
        cols=t.shape[1],
        entry=op.entry,
        row_range=[a, b] if op.rows else None,
        saturated=tally.saturated,
        intended_norm=tally.d2**0.5,
        rounding_error=(tally.e2 / tally.d2s) ** 0.5 if tally.d2s > 0 else 0.0,
        changed_fraction=tally.changed / max(1, tally.rows * (t.numel // max(1, t.shape[0]))),
        base_match=None if op.base_sha256 is None else sha_in == op.base_sha256,
        sha256_in=sha_in if hash_bytes or op.base_sha256 is not None else "",
        sha256_out=h_out.hexdigest() if h_out is not None else "",
    )
    captured = None
    if capture:
        U = torch.cat(tally.added_U) if tally.added_U else torch.zeros(0, op.V.shape[1])
        idx = torch.cat(tally.miss_index) if tally.miss_index else torch.zeros(0, dtype=torch.int64)
        val = (
            torch.cat(tally.miss_value)
            if tally.miss_value
            else torch.zeros(0, dtype=TORCH_DTYPES[t.dtype])
        )
        captured = Captured(U, Restore(idx.to(torch.int64), val))
    return EditResult(stats, captured)


def validate_copy(src: Header, dst: Path) -> None:
    """Re-open what was written: same tensors, dtypes, shapes and offsets as the source."""
    out = read_header(dst)
    a = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in src.tensors.values()]
    b = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in out.tensors.values()]
    if a != b:
        raise OutputError(
            f"validation of {dst} failed: its tensor table differs from the input's; nothing was kept"
        )
