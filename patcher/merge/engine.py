"""Apply and revert: plan (``plan``), stream (``kernel``), record (``provenance``, ``records``).

``apply_delta`` and ``revert_delta`` turn a plan's ``EditOp``s into kernel jobs, write the whole
output atomically (a file, a sharded checkpoint, a component or pipeline folder) and return a
``Report`` built from the kernel's ``EditStats``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import Checkpoint
from ..errors import AlreadyApplied, OutputError, RevertError
from ..output import check_name, check_target
from ..progress import NullReporter, Reporter
from ..vud.delta import Delta, read_delta
from . import provenance
from .kernel import Job
from .ops import MAP, RECOMPUTED, EditOp, EditResult, EditStats
from .plan import Plan, base_difference, plan_apply
from .provenance import AppliedRecord
from .records import RECORD_FORMAT, RevertRecord, op_tag, result_tag, write_record
from .writer import resolve_out, write_checkpoint

__all__ = [
    "RECORD_FORMAT",
    "NullReporter",
    "Report",
    "Reporter",
    "apply_delta",
    "plan_apply",
    "revert_delta",
]

SURVIVAL_WARN = 0.5  # warn when the rounding error exceeds half the intended edit

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
    tensors: list[EditStats] = field(default_factory=list)
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


def _warn_rounding(stats: list[EditStats]) -> list[str]:
    return [
        f"{s.key} ({s.file}): only {max(0.0, 1 - s.rounding_error):.0%} of the edit survived rounding to {s.dtype}"
        f" ({s.changed_fraction:.1%} of elements changed); the edit is below this dtype's resolution, try a higher --strength or an fp32 checkpoint"
        for s in stats
        if s.rounding_error > SURVIVAL_WARN
    ]


def _inputs(plan: Plan) -> list[Path]:
    """Every path the command reads: never a target of its outputs."""
    ck = plan.checkpoint
    paths = [ck.root, *(f for ws in ck.weight_sets for f in ws.files)]
    if plan.delta.path is not None:
        paths.append(Path(plan.delta.path))
    return paths


def _check_outputs(
    ck: Checkpoint, out: Path, inputs: list[Path], overwrite: bool, record: Path | None
) -> None:
    """Refuse a bad -o or --revert-record before any work (the writers check again)."""
    check_target(out, inputs, overwrite, "checkpoint", folder=ck.layout != "file")
    if record is None:
        return
    check_name(record)
    if os.path.abspath(record) == os.path.abspath(out) or record.resolve().is_relative_to(
        out.resolve()
    ):
        raise OutputError(
            f"--revert-record {record} would be written at or inside the output {out}; keep the record apart from the model (it undoes the edit)"
        )
    check_target(record, [*inputs, out], overwrite, "record", folder=False, flag="--revert-record")


# --------------------------------------------------------------------------- apply


def _apply_warnings(plan: Plan, stats: list[EditStats]) -> list[str]:
    out = _warn_rounding(stats)
    out += [
        f"{s.key}: {s.saturated} value(s) exceeded the {s.dtype} range after the edit and were clamped to its largest value"
        for s in stats
        if s.saturated
    ]
    out += [
        f"{m.entry.key}: target differs from the probed base"
        + base_difference(m)
        + "; "
        + (
            "U was recomputed from the target's own weight"
            if m.entry.kind in RECOMPUTED and not plan.use_factors
            else "the base's factors were added as they are"
        )
        for m in plan.matched
        if m.base_match is False
    ]
    if len(plan.matched) < len(plan.in_scope):
        out.append(
            f"partial: {len(plan.matched)}/{len(plan.in_scope)} entries applied (--allow-partial)"
        )
    return out


def _refuse_reapply(plan: Plan) -> None:
    dl = plan.delta
    carried = provenance.carrying(plan)
    if carried:
        raise AlreadyApplied(
            f"{carried[0]} already contains delta {dl.sha256[:12]} ({dl.concept_name}); applying it twice compounds the edit. Pass --force to do it anyway"
        )


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
        fingerprints=dry_run,  # a real run checks them while streaming
        revision=revision,
    )
    dl = plan.delta
    if not force:
        _refuse_reapply(plan)
        from ..vud.combine import stacking_conflicts

        stacked = stacking_conflicts(plan)
        if stacked:
            raise AlreadyApplied(
                f"{plan.checkpoint.root} already carries another vpatch delta that edited {stacked[0]}"
                f" ({len(stacked)} shared weight(s)); a second projection on top is not the joint projection of both concepts."
                " Merge the deltas (vpatch merge first.vud second.vud -o both.vud) and apply that to the original checkpoint, or pass --force"
            )
    if out is None:  # next to the input, named after it and the concept(s)
        from ..naming import derived_output

        out = derived_output(checkpoint, dl)
    ck = plan.checkpoint
    out = resolve_out(ck, out)
    record_path = Path(revert_record) if revert_record else None
    inputs = _inputs(plan)
    _check_outputs(ck, out, inputs, overwrite, record_path)  # a dry run refuses what a run would
    if dry_run:
        rep_ = _report("dry-run", plan, out)
        rep_.warnings += [
            f"{m.entry.key}: target differs from the probed base (fine-tune?)"
            for m in plan.matched
            if m.base_match is False
        ]
        return rep_
    ops = plan.ops()
    prov = provenance.ApplyStamp(
        plan,
        AppliedRecord(
            delta_sha256=dl.sha256,
            concept=dl.concept_name,
            strength=float(strength),
            mode="factors" if use_factors else "recompute",
            entries=len(plan.matched),
            vpatch=__version__,
            diverged=tuple(sorted(op_tag(ck, op) for op in ops)),
        ),
    )

    def write_revert_record(results: list[EditResult]) -> None:
        if record_path is not None:
            write_record(record_path, ck, results, dl.sha256, [*inputs, out], overwrite, notes)

    notes: list[str] = []
    results = write_checkpoint(
        plan,
        out,
        [Job(op) for op in ops],
        prov.meta_for,
        prov.index_meta,
        rep,
        overwrite,
        inputs=inputs,
        notes=notes,
        hash_bytes=record_path is not None,
        capture=record_path is not None,
        after_write=write_revert_record,
    )
    stats = [r.stats for r in results]
    for m in plan.matched:
        seen = [s.base_match for s in stats if s.entry == m.entry.key and Path(s.file) in m.files()]
        m.base_match = None if not seen or None in seen else all(seen)
    report = _report("apply", plan, out)
    report.tensors = stats
    report.revert_record = str(record_path) if record_path else None
    report.warnings += notes
    report.warnings += _apply_warnings(plan, stats)
    return report


# --------------------------------------------------------------------------- revert


def _inverse_map(op: EditOp) -> torch.Tensor:
    """P' with (I + λ P Vᵀ)⁻¹ = I + P' Vᵀ (Woodbury): P' = −λ P (I + λ VᵀP)⁻¹."""
    lam = op.strength
    P, V = op.P.double(), op.V.double()
    K = torch.eye(P.shape[1], dtype=torch.float64) + lam * (V.T @ P)
    if float(torch.linalg.svdvals(K).min()) < 1e-6:
        raise RevertError(
            f"{op.entry}: this input-side map sends some inputs to zero, so on a checkpoint other than the probed base it cannot be undone; revert needs the revert record written by apply --revert-record"
        )
    return (-lam * P @ torch.linalg.inv(K)).float()


def _inverse(
    op: EditOp, name: str, applied: AppliedRecord, record: RevertRecord | None
) -> tuple[Job, str | None]:
    """The job that undoes ``op``, and the sha256 its output must have (None: nothing to check)."""
    plain = dataclasses.replace(op, base_sha256=None)  # the kernel's base check is apply's
    if record is not None:
        part = record.edit_for(name, op)
        inv = dataclasses.replace(plain, U=part.U, strength=-1.0, recompute=False)
        return Job(inv, part.restore), part.original
    if op.kind == "project_input" and applied.mode == "recompute" and name in applied.diverged:
        lam = op.strength
        if abs(lam - 1.0) < 1e-6:
            raise RevertError(
                f"{op.entry}: a λ=1 projection on a checkpoint other than the probed base removed that component for good; revert needs the revert record written by apply --revert-record"
            )
        # W = W'(I - μ BBᵀ), μ = λ/(λ-1)
        return Job(dataclasses.replace(plain, strength=lam / (lam - 1.0), recompute=True)), None
    if op.kind == MAP and applied.mode == "recompute" and name in applied.diverged:
        inv = dataclasses.replace(plain, P=_inverse_map(op), strength=1.0, recompute=True)
        return Job(inv), None
    inv = dataclasses.replace(plain, strength=-applied.strength, recompute=False)
    return Job(inv), op.base_sha256 if op.base_dtype in (None, op.dtype) else None


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
    applied = provenance.applied_to(plan)
    # the inverse edits are planned with the strength and mode the provenance records
    plan = dataclasses.replace(
        plan, strength=applied.strength, use_factors=applied.mode == "factors", _ops=None
    )
    ck = plan.checkpoint
    out = resolve_out(ck, out)
    inputs = _inputs(plan) + ([Path(record)] if record is not None else [])
    _check_outputs(ck, out, inputs, overwrite, None)
    rec = RevertRecord(Path(record), dl.sha256) if record is not None else None
    jobs: list[Job] = []
    expect: dict[str, str | None] = {}  # tag -> the sha256 the reverted bytes must have
    for op in plan.ops():
        name = op_tag(ck, op)
        job, expect[name] = _inverse(op, name, applied, rec)
        jobs.append(job)

    removal = provenance.RevertStamp(ck.root, dl.sha256)
    checked: list[EditStats] = []

    def verify(results: list[EditResult]) -> None:
        for r in results:
            want = expect.get(result_tag(ck, r))
            checked.append(
                dataclasses.replace(
                    r.stats, exact=None if want is None else r.stats.sha256_out == want
                )
            )
        bad = [s for s in checked if s.exact is False]
        if bad and not allow_inexact:
            if rec is not None:
                raise RevertError(
                    f"{len(bad)} tensor(s) (first: {bad[0].key}) do not match the original fingerprint stored in the revert record {rec.path}: "
                    "the record does not match this checkpoint (it was written for another apply of this delta, or it or the checkpoint was altered). Use the record written with this output"
                )
            raise RevertError(
                f"{len(bad)} tensor(s) (first: {bad[0].key}) do not match the original fingerprint after revert: rounding in {bad[0].dtype} left some elements off."
                " Revert with the record from `apply --revert-record`, or pass --allow-inexact to keep the approximate result"
            )

    notes: list[str] = []
    write_checkpoint(
        plan,
        out,
        jobs,
        removal.meta_for,
        removal.index_meta,
        rep,
        overwrite,
        inputs=inputs,
        notes=notes,
        hash_bytes=True,
        capture=False,
        after_write=verify,
    )
    report = _report("revert", plan, out)
    report.strength, report.mode = applied.strength, applied.mode
    report.tensors = checked
    report.warnings += notes
    report.warnings += [
        f"{s.key}: reverted approximately (fingerprint differs)"
        for s in checked
        if s.exact is False
    ]
    report.warnings += [
        f"{s.key}: no fingerprint to verify against" for s in checked if s.exact is None
    ]
    return report
