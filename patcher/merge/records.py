"""Revert records: what ``apply --revert-record`` keeps so that ``revert`` is bit-exact.

A record is a safetensors file (``vpatch.format`` = ``vud-revert``) holding, per edit, the U rows
that were added and the flat positions and stored values that the inverse edit alone would miss by
rounding, plus the sha256 of every original tensor. It undoes the edit: keep it private.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import FormatError, RevertError
from ..output import atomic_file
from ..safetensors_io import TORCH_DTYPES, Header, TensorReader, read_header, save_tensors
from .ops import EditOp, EditResult, Restore

RECORD_FORMAT = "vud-revert"
_SHA = re.compile(r"[0-9a-f]{64}")


def tag(ck: Checkpoint, f: Path, key: str, rows: tuple[int, int] | list[int] | None = None) -> str:
    """Name of an edit in a revert record: stable across -o renames of a single file; a fused
    tensor's row block carries its rows."""
    name = key if rows is None else f"{key}[{rows[0]}:{rows[1]}]"
    if ck.layout == "file":
        return name
    root = ck.root.parent if ck.layout == "sharded" else ck.root
    return f"{f.relative_to(root).as_posix()}::{name}"


def op_tag(ck: Checkpoint, op: EditOp) -> str:
    return tag(ck, op.file, op.key, op.rows)


def result_tag(ck: Checkpoint, r: EditResult) -> str:
    return tag(ck, Path(r.stats.file), r.stats.key, r.stats.row_range)


def write_record(
    path: Path,
    ck: Checkpoint,
    results: list[EditResult],
    delta_sha: str,
    inputs: list[Path],
    overwrite: bool,
    notes: list[str] | None = None,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    originals: dict[str, str] = {}
    for r in results:
        name = result_tag(ck, r)
        assert r.captured is not None  # apply captures every edit when a record is asked for
        tensors[f"{name}::U"] = r.captured.U
        tensors[f"{name}::fix_index"] = r.captured.restore.index
        tensors[f"{name}::fix_value"] = r.captured.restore.value
        originals[name] = r.stats.sha256_in
    meta = {
        "vpatch.format": RECORD_FORMAT,
        "vpatch.delta_sha256": delta_sha,
        "vpatch.originals": json.dumps(originals),
    }
    with atomic_file(path, inputs, overwrite, "record", notes) as tmp:
        save_tensors(tmp, tensors, meta)
        os.chmod(tmp, 0o600)  # private: it undoes the edit
        read_header(tmp)


@dataclass(frozen=True, eq=False)
class RecordEdit:
    """What a record holds for one edit: the U rows to subtract, what to put back, the original sha256."""

    U: torch.Tensor
    restore: Restore
    original: str


class RevertRecord:
    """A revert record read and checked against the delta it belongs to."""

    def __init__(self, path: Path, delta_sha: str):
        self.path = path
        try:
            self.header: Header = read_header(path)
        except FormatError as e:
            raise RevertError(f"--record: {e}") from None
        meta = self.header.metadata
        if meta.get("vpatch.format") != RECORD_FORMAT:
            raise RevertError(f"{path} is not a vpatch revert record")
        if meta.get("vpatch.delta_sha256") != delta_sha:
            raise RevertError(
                f"{path} belongs to another delta ({meta.get('vpatch.delta_sha256', '?')[:12]}), not {delta_sha[:12]}"
            )
        try:
            originals = json.loads(meta.get("vpatch.originals", ""))
        except (ValueError, RecursionError):
            originals = None
        if not isinstance(originals, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA.fullmatch(v)
            for k, v in originals.items()
        ):
            raise self._damaged("vpatch.originals is not a map of tensor names to sha256")
        self.originals: dict[str, str] = originals

    def _damaged(self, what: str) -> RevertError:
        return RevertError(
            f"{self.path}: the revert record does not match this checkpoint and delta ({what}); it was altered or written for another apply. Use the record written with this output"
        )

    def edit_for(self, name: str, op: EditOp) -> RecordEdit:
        """The record's part for one edit, checked against the op's shape and stored dtype."""
        ts = self.header.tensors
        parts = [f"{name}::U", f"{name}::fix_index", f"{name}::fix_value"]
        if not all(p in ts for p in parts) or name not in self.originals:
            raise self._damaged(f"it has no entry for {name}")
        u, idx, val = (ts[p] for p in parts)
        rows, cols = op.shape
        if u.dtype != "F32" or u.shape != (rows, op.rank):
            raise self._damaged(
                f"{name}::U is {u.dtype} {list(u.shape)}, expected F32 {[rows, op.rank]}"
            )
        if idx.dtype != "I64" or len(idx.shape) != 1:
            raise self._damaged(f"{name}::fix_index is not a list of int64 positions")
        if val.dtype != op.dtype or val.shape != idx.shape or op.dtype not in TORCH_DTYPES:
            raise self._damaged(f"{name}::fix_value is not {idx.shape[0]} values of {op.dtype}")
        with TensorReader(self.header) as rd:
            U, index, value = rd.tensor(parts[0]), rd.tensor(parts[1]), rd.tensor(parts[2])
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows * cols):
            raise self._damaged(f"{name}::fix_index points outside the tensor")
        if not bool(torch.isfinite(U).all()):
            raise self._damaged(f"{name}::U holds NaN or Inf")
        return RecordEdit(U, Restore(index, value), self.originals[name])
