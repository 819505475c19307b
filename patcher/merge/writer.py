"""Writing a whole output: the patched files through the kernel, everything else copied, atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import Checkpoint, load_index
from ..errors import OutputError
from ..output import atomic_dir, atomic_file, check_name
from ..progress import Reporter
from ..safetensors_io import Header, copy_file, rewrite_metadata
from .kernel import COPY_PIECE, Job, patch_file, validate_copy
from .ops import EditResult
from .plan import Plan

MetaFor = Callable[[Header, list[EditResult] | None], dict[str, str]]
IndexMeta = Callable[[dict, list[EditResult]], dict]


def resolve_out(ck: Checkpoint, out: Path | str) -> Path:
    """The output path, refused when it cannot be what the input's layout writes: a single file's
    output is a file path (not an existing folder, not a path ending in a separator)."""
    text = str(out)
    out = Path(out)
    check_name(out)
    if ck.layout == "file" and (out.is_dir() or text.endswith(("/", os.sep))):
        raise OutputError(
            f"output {text} is a folder, but the input {ck.root.name} is one file: -o names the file"
            f" to write (for example {out / ck.root.name}), which must not exist"
        )
    return out


def _jobs_by_file(jobs: list[Job]) -> dict[Path, dict[str, list[Job]]]:
    out: dict[Path, dict[str, list[Job]]] = {}
    for j in jobs:
        out.setdefault(j.op.file, {}).setdefault(j.op.key, []).append(j)
    return out


def write_checkpoint(
    plan: Plan,
    out: Path,
    jobs: list[Job],
    meta_for: MetaFor,
    index_meta: IndexMeta,
    rep: Reporter,
    overwrite: bool,
    *,
    inputs: list[Path],
    hash_bytes: bool,
    capture: bool,
    after_write: Callable[[list[EditResult]], None] | None = None,
    notes: list[str] | None = None,
) -> list[EditResult]:
    """Write the whole output (file or folder) atomically.

    ``meta_for(header, results)`` gives a patched file's metadata: first with ``results=None`` to
    reserve the header (worst case), then with every edit's results once all files are streamed,
    when what the provenance says (e.g. which targets differed from the base) is known. Index files
    are written last, with ``index_meta(metadata, results)``. ``inputs``: every path the command
    reads (never the target); ``notes`` collects what stale temporaries were removed.
    """
    ck = plan.checkpoint
    by_file = _jobs_by_file(jobs)
    results: list[EditResult] = []
    patched: list[tuple[Header, Path]] = []

    def patch(src: Path, dst: Path) -> None:
        h = plan.header(src)
        results.extend(
            patch_file(
                h,
                dst,
                by_file[src],
                meta_for(h, None),
                rep,
                hash_bytes=hash_bytes,
                capture=capture,
            )
        )
        patched.append((h, dst))

    def finalize() -> None:
        for h, dst in patched:
            rewrite_metadata(dst, meta_for(h, results))
            validate_copy(h, dst)

    rep.start("writing", ck.total_bytes())
    try:
        if ck.layout == "file":
            with atomic_file(out, inputs, overwrite, "checkpoint", notes) as tmp:
                patch(ck.root, tmp)
                finalize()
                if after_write:
                    after_write(results)
            return results
        root = ck.root.parent if ck.layout == "sharded" else ck.root
        index_files = {ws.index: ws for ws in ck.weight_sets if ws.index is not None}
        if ck.layout == "sharded":
            sources = [ck.root] + ck.weight_sets[0].files
        else:
            sources = ck.files
        with atomic_dir(out, inputs, overwrite, "checkpoint", notes) as tmp:
            rewrite_index: list[Path] = []
            for src in sources:
                rel = src.relative_to(root)
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src in by_file:
                    patch(src, dst)
                elif src in index_files and any(f in by_file for f in index_files[src].files):
                    rewrite_index.append(src)
                else:
                    copy_file(
                        src, dst, COPY_PIECE, rep.advance if src.suffix == ".safetensors" else None
                    )
            finalize()
            for src in rewrite_index:
                obj = dict(index_files[src].index_json or {})
                obj["metadata"] = index_meta(dict(obj.get("metadata") or {}), results)
                (tmp / src.relative_to(root)).write_text(
                    json.dumps(obj, indent=2) + "\n", encoding="utf-8"
                )
            for idx in index_files:  # every index must resolve in the new folder
                new = tmp / idx.relative_to(root)
                if new.exists():
                    load_index(new)
            if after_write:
                after_write(results)
        return results
    finally:
        rep.stop()
