"""The probe: find a concept's refusal direction(s) in a model and write them as a ``.vud`` delta.

It runs in three steps, each usable alone:

1. ``capture`` (capture.py) runs the concept's prompts through the encoder (or the pipeline) and
   returns ``Activations`` (activations.py): what every edit site reads, plus what a build needs.
   ``write_activations``/``read_activations`` save and reload them (safetensors, never pickle).
2. ``build_delta`` (build.py) turns activations and ``ProbeParams`` (params.py: method, k, α, λ, m,
   pooling) into a ``Delta`` without running a model; the base weights W come from a
   ``WeightReader`` (sources.py), so one capture serves many deltas.
3. ``write_delta`` (vud/delta.py) writes it atomically.

``probe`` is the three in a row. Where things live: sources.py (model folders, hub, base weights),
encoders.py (transformers encoders), sites.py (which weights a site targets, the small chains).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import OutputError, ProbeError
from ..families.recipes import Concept
from ..merge.engine import Reporter
from ..vud.delta import write_delta
from .activations import Activations, read_activations, write_activations
from .build import METHODS, TOKEN_METHODS, Built, GroupResult, build, build_delta
from .capture import CaptureOptions, capture
from .params import ProbeParams
from .sources import ModelSource, WeightReader, open_model


@dataclass(frozen=True)
class ProbeReport:
    delta: str | None  # None when only activations were saved
    delta_sha256: str | None
    family: str
    concept: str
    method: dict | None
    groups: list[GroupResult] | list[dict]  # built: per group results; capture only: summaries
    device: str
    activations: str | None = None  # where the activations were saved, if they were

    def to_dict(self) -> dict:
        return asdict(self)


def report(built: Built, acts: Activations, out: Path, digest: str) -> ProbeReport:
    """The summary of one written delta (what ``vpatch probe`` and ``vpatch build`` print)."""
    return ProbeReport(
        str(out),
        digest,
        acts.family,
        acts.concept_name,
        built.delta.method,
        built.groups,
        acts.capture.device,
        None if acts.path is None else str(acts.path),
    )


def probe(
    model: str | Path | ModelSource,
    concept: str | Path | Concept,
    out: str | Path | None,
    options: CaptureOptions | None = None,
    params: ProbeParams | None = None,
    *,
    save_activations: str | Path | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
) -> ProbeReport:
    """Probe MODEL for CONCEPT and write the delta to OUT (atomically): capture, build, write.

    ``save_activations`` also keeps the captured activations, so that ``build_delta`` (or ``vpatch
    build``) can make more deltas from them later; with ``out=None`` only they are written.
    """
    from ..output import check_target

    opt = options or CaptureOptions()
    prm = params or ProbeParams()  # already checked when it was made: nothing is loaded yet
    if out is None and save_activations is None:
        raise ProbeError("probe: nothing to write; give -o OUT, --save-activations FILE or both")
    if out is not None and save_activations is not None:
        a, b = Path(out), Path(save_activations)
        if os.path.realpath(a) == os.path.realpath(b) or (
            a.exists() and b.exists() and a.samefile(b)
        ):
            raise OutputError(
                f"-o and --save-activations are both {out}: the activations would be written there"
                " and the delta refused; give them different paths"
            )
    for p, kind, flag in (
        (out, "delta", "-o"),
        (save_activations, "activations", "--save-activations"),
    ):  # before any model loads
        if p is not None:
            check_target(Path(p), _local_inputs(model), overwrite, kind, flag=flag)
    if prm.method is not None and prm.method in TOKEN_METHODS:
        opt = replace(opt, token_roles=True)  # what a token-aligned method needs is captured too
    if prm.scan:
        opt = replace(opt, scan=prm.scan)  # the twin's vocabulary scan is captured with it
    src = open_model(model, opt)
    weights = WeightReader(src)
    acts = capture(src, concept, opt, weights, reporter, log)
    if save_activations is not None:
        write_activations(save_activations, acts, overwrite=overwrite)
        acts = replace(acts, path=Path(save_activations))
    if out is None:
        s = acts.summary()
        return ProbeReport(
            None,
            None,
            acts.family,
            acts.concept_name,
            None,
            s["groups"],
            acts.capture.device,
            s["activations"],
        )
    built = build(acts, prm, weights)
    digest = write_delta(Path(out), built.delta, overwrite=overwrite)
    return report(built, acts, Path(out), digest)


def _local_inputs(model: str | Path | ModelSource) -> list[Path]:
    """The model's files on disk, which no output may replace or be written into."""
    root = model.root if isinstance(model, ModelSource) else Path(model)
    return [Path(root)] if root is not None and Path(root).exists() else []


def probe_concepts(
    model: str | Path | ModelSource,
    concepts: list[str | Path | Concept],
    out: str | Path,
    options: CaptureOptions | None = None,
    params: ProbeParams | None = None,
    *,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
) -> ProbeReport:
    """Several concepts in one delta: each is captured and built on its own, on one loaded model,
    then merged (vud/combine.py), so a weight two concepts edit gets one projection onto the
    complement of their joint span rather than a chain of edits."""
    from ..output import check_target
    from ..vud.combine import merge_deltas

    if len(concepts) < 2:
        return probe(
            model,
            concepts[0],
            out,
            options,
            params,
            overwrite=overwrite,
            reporter=reporter,
            log=log,
        )
    opt = options or CaptureOptions()
    prm = params or ProbeParams()
    check_target(Path(out), _local_inputs(model), overwrite, "delta")
    if prm.method is not None and prm.method in TOKEN_METHODS:
        opt = replace(opt, token_roles=True)
    if prm.scan:
        opt = replace(opt, scan=prm.scan)
    src = open_model(model, opt)
    weights = WeightReader(src)
    parts = []
    for c in concepts:
        acts = capture(src, c, opt, weights, reporter, log)
        parts.append((acts, build(acts, prm, weights)))
    merged = merge_deltas([b.delta for _, b in parts])
    digest = write_delta(Path(out), merged, overwrite=overwrite)
    first = parts[0][0]
    return ProbeReport(
        str(out),
        digest,
        first.family,
        merged.concept_name,
        parts[0][1].delta.method,
        [g for _, b in parts for g in b.groups],
        first.capture.device,
    )


__all__ = [
    "METHODS",
    "Activations",
    "Built",
    "CaptureOptions",
    "GroupResult",
    "ProbeParams",
    "ProbeReport",
    "WeightReader",
    "build",
    "build_delta",
    "capture",
    "open_model",
    "probe",
    "probe_concepts",
    "read_activations",
    "report",
    "write_activations",
]
