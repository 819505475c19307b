"""What is in a ``.vud`` or a checkpoint, as plain dicts (the CLI renders them)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checkpoint import open_checkpoint
from .delta import read_delta
from .refusal import lowrank_norm
from .safetensors_io import read_header


def inspect_delta(path: Path) -> dict:
    d = read_delta(path)
    layers = [
        {**e.map_record(), "norm_U": float(e.U.norm()), "norm_V": float(e.V.norm()), "norm_UVt": lowrank_norm(e.U, e.V)}
        for e in d.entries
    ]
    return {"type": "delta", "path": str(path), "delta_sha256": d.sha256, "concept": d.concept, "method": d.method,
            "versions": d.versions, "components": d.components(), "layers": layers}


def inspect_checkpoint(path: Path) -> dict:
    ck = open_checkpoint(path)
    dtypes: Counter = Counter()
    count = 0
    applied: dict[str, dict] = {}
    sets = []
    for comp in ck.components:
        for ws in comp.weight_sets:
            n = sum(len(h.tensors) for h in ws.headers.values())
            count += n
            for h in ws.headers.values():
                for t in h.tensors.values():
                    dtypes[t.dtype] += t.nbytes
            for r in ws.metadata_records():
                applied.setdefault(r.get("delta_sha256", "?"), r)
            sets.append({"component": comp.name, "weights": ws.label, "variant": ws.variant, "files": len(ws.files), "tensors": n})
    return {"type": "checkpoint", "path": str(path), "layout": ck.layout, "tensors": count, "total_bytes": ck.total_bytes(),
            "dtype_bytes": dict(dtypes), "weight_sets": sets, "applied": list(applied.values())}


def inspect_path(path: str | Path) -> dict:
    """A ``.vud`` gets its layer map; anything else is opened as a checkpoint."""
    path = Path(path)
    if path.is_file() and (path.suffix == ".vud" or (path.suffix == ".safetensors" and read_header(path).metadata.get("vpatch.format") == "vud")):
        return inspect_delta(path)
    return inspect_checkpoint(path)
