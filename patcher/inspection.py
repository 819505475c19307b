"""What is in a ``.vud`` or a checkpoint, as plain dicts (the CLI renders them)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checkpoint import open_checkpoint
from .erasure.refusal import lowrank_norm
from .errors import CompatibilityError
from .merge.plan import plan_apply
from .safetensors_io import read_header
from .vud.combine import entry_concepts
from .vud.delta import read_delta


def inspect_delta(path: Path) -> dict:
    d = read_delta(path)
    layers = [
        {
            **e.map_record(),
            "norm_U": float(e.U.norm()),
            "norm_V": float(e.V.norm()),
            "norm_UVt": lowrank_norm(e.U, e.V),
        }
        for e in d.entries
    ]
    owners = entry_concepts(d)
    for L in layers:
        L["concepts"] = owners[L["key"]]
    return {
        "type": "delta",
        "path": str(path),
        "delta_sha256": d.sha256,
        "concept": d.concept,
        "method": d.method,
        "versions": d.versions,
        "components": d.components(),
        "layers": layers,
    }


def inspect_checkpoint(path: Path) -> dict:
    from .merge import provenance

    ck = open_checkpoint(path)
    dtypes: Counter = Counter()
    count = 0
    sets = []
    pickles: list[dict] = []
    for comp in ck.components:
        for ws in comp.weight_sets:
            n = sum(len(h.tensors) for h in ws.headers.values())
            count += n
            for h in ws.headers.values():
                for t in h.tensors.values():
                    dtypes[t.dtype] += t.nbytes
            sets.append(
                {
                    "component": comp.name,
                    "weights": ws.label,
                    "variant": ws.variant,
                    "files": len(ws.files),
                    "tensors": n,
                }
            )
        # listed, never opened: a pickle-only component must not vanish from the listing
        pickles += [
            {"component": comp.name, "file": f.name, "only": not comp.weight_sets}
            for f in comp.pickle_files
        ]
    return {
        "type": "checkpoint",
        "path": str(path),
        "layout": ck.layout,
        "tensors": count,
        "total_bytes": ck.total_bytes(),
        "dtype_bytes": dict(dtypes),
        "weight_sets": sets,
        "pickle_files": pickles,
        "applied": ck.applied(),
        # a delta only a variant file carries: from_pretrained loads the unedited default weights
        "warnings": provenance.edits_not_loaded(ck),
    }


def inspect_lora(path: Path) -> dict:
    """A LoRA written by ``vpatch export``: its modules, concepts and the base it was computed for."""
    from .vud.lora import lora_to_delta

    meta = read_header(path).metadata
    d = lora_to_delta(path)
    return {
        "type": "lora",
        "path": str(path),
        "target": meta.get("vpatch.target"),
        "family": meta.get("vpatch.family"),
        "component": meta.get("vpatch.component"),
        "delta_sha256": meta.get("vpatch.delta_sha256"),
        "concepts": entry_concepts(d),
        "layers": [{**e.map_record(), "norm_UVt": lowrank_norm(e.U, e.V)} for e in d.entries],
    }


def inspect_path(path: str | Path) -> dict:
    """A ``.vud`` gets its layer map, a vpatch LoRA its modules; anything else is opened as a checkpoint."""
    path = Path(path)
    from .vud.lora import is_lora

    if is_lora(path):
        return inspect_lora(path)
    if path.is_file() and (
        path.suffix == ".vud"
        or (
            path.suffix == ".safetensors"
            and read_header(path).metadata.get("vpatch.format") == "vud"
        )
    ):
        return inspect_delta(path)
    return inspect_checkpoint(path)


def inspect_resolution(path: str | Path, delta: str | Path, component: str | None = None) -> dict:
    """How each delta entry resolves against a checkpoint: which file and dtype, or why not, and
    whether the tensor is the exact one the delta was probed from (its sha256)."""
    from .vud.lora import is_lora, lora_to_delta

    dl = lora_to_delta(delta) if is_lora(delta) else delta  # a LoRA: its recorded base fingerprints
    try:
        plan = plan_apply(path, dl, component=component, allow_partial=True, fingerprints=True)
    except CompatibilityError as e:
        plan = getattr(e, "plan", None)
        if plan is None:
            raise
    cov = plan.coverage()
    verdict = (
        "compatible"
        if cov["matched"] == cov["expected"]
        else ("partial" if cov["matched"] else "incompatible")
    )
    from .merge import provenance

    carried = provenance.carrying(plan)
    if carried:  # apply refuses it: a second application compounds the edit
        verdict = "already applied"
    rows = []
    for m in plan.matches:
        files = sorted({str(f) for f in m.files()})
        rows.append(
            {
                "key": m.entry.key,
                "status": m.status,
                "note": m.note,
                "dtype": m.dtype,
                "files": files,
                "stored": sorted({loc.label() for loc in m.locs}),
                "how": "; ".join(sorted({loc.how for loc in m.locs})),
                "fingerprint": {True: "base", False: "differs", None: "-"}[m.base_match],
            }
        )
    return {
        "type": "resolution",
        "path": str(path),
        "delta": str(delta),
        "delta_sha256": plan.delta.sha256,
        "component": plan.component,
        "how": plan.how,
        "verdict": verdict,
        "warnings": [
            f"{m.entry.key}: this checkpoint's weight differs from the base the LoRA was computed from; its lora_B = −λ W u is exact only on that base"
            for m in plan.matched
            if m.base_match is False and dl is not delta
        ]
        + [
            f"{label} already contains this delta; apply refuses it (--force applies it a second time)"
            for label in carried
        ],
        "coverage": cov,
        "entries": rows,
    }
