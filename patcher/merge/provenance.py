"""Provenance: the ``vpatch.applied`` record an apply leaves in every file it patched.

One record per delta, as a JSON list in the safetensors ``__metadata__`` (and in an index's
``metadata``). ``apply`` reads it to refuse a second application, ``revert`` to know the strength
and mode, ``inspect`` and ``push`` to say what was removed. A record that does not parse is an
error naming the file, never a traceback and never silently ignored (it could hide a delta).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, RevertError
from .records import result_tag

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint, WeightSet
    from ..safetensors_io import Header
    from .ops import EditResult
    from .plan import Plan

KEY = "vpatch.applied"
MODES = ("recompute", "factors")
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AppliedRecord:
    delta_sha256: str
    concept: str
    strength: float
    mode: str  # recompute | factors
    entries: int
    vpatch: str  # the version that applied it
    diverged: tuple[str, ...] = ()  # revert-record tags of targets that differed from the base

    def to_dict(self) -> dict:
        return {
            "delta_sha256": self.delta_sha256,
            "concept": self.concept,
            "strength": self.strength,
            "mode": self.mode,
            "entries": self.entries,
            "vpatch": self.vpatch,
            "diverged": list(self.diverged),
        }

    @classmethod
    def from_dict(cls, d: object, where: str) -> AppliedRecord:
        def bad(what: str) -> FormatError:
            return FormatError(
                f"{where}: damaged {KEY} provenance ({what}); the file was edited after vpatch wrote it. Remove the {KEY} metadata only if you know which deltas the weights carry"
            )

        if not isinstance(d, dict):
            raise bad("a record is not an object")
        sha = d.get("delta_sha256")
        if not isinstance(sha, str) or not _SHA.fullmatch(sha):
            raise bad("delta_sha256 is not a sha256")
        strength = d.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise bad("strength is not a number")
        if not math.isfinite(strength):
            raise bad("strength is not finite")
        mode = d.get("mode", "recompute")
        if mode not in MODES:
            raise bad(f"mode is not one of {', '.join(MODES)}")
        concept, version = d.get("concept", ""), d.get("vpatch", "")
        if not isinstance(concept, str) or not isinstance(version, str):
            raise bad("concept or vpatch is not a string")
        entries = d.get("entries", 0)
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
            raise bad("entries is not a count")
        diverged = d.get("diverged") or []
        if not isinstance(diverged, list) or not all(isinstance(x, str) for x in diverged):
            raise bad("diverged is not a list of names")
        return cls(sha, concept, float(strength), mode, entries, version, tuple(diverged))


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{where}: {KEY} holds text that is not valid UTF-8") from None


def parse_list(value: object, where: str) -> list[AppliedRecord]:
    """The records of a decoded ``vpatch.applied`` value (a JSON list)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise FormatError(f"{where}: damaged {KEY} provenance (not a list of records)")
    return [AppliedRecord.from_dict(d, where) for d in value]


def parse(meta: dict[str, str], where: str) -> list[AppliedRecord]:
    """The records in a safetensors ``__metadata__``."""
    raw = meta.get(KEY)
    if not raw:
        return []
    _check_text(raw, where)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested past the parser's depth
        raise FormatError(f"{where}: damaged {KEY} provenance (not JSON)") from None
    return parse_list(value, where)


def records(ws: WeightSet) -> list[AppliedRecord]:
    """The records found in a weight set's headers (one list per edited file, merged)."""
    seen: dict[AppliedRecord, None] = {}
    for f, h in ws.headers.items():
        for r in parse(h.metadata, str(f)):
            seen.setdefault(r, None)
    return list(seen)


def applied(ck: Checkpoint) -> list[AppliedRecord]:
    """One record per delta carried by any weight set of the checkpoint."""
    seen: dict[str, AppliedRecord] = {}
    for ws in ck.weight_sets:
        for r in records(ws):
            seen.setdefault(r.delta_sha256, r)
    return list(seen.values())


def edits_not_loaded(ck: Checkpoint) -> list[str]:
    """Where the weights a pipeline loads lack a delta that files beside them carry, one sentence
    each: a weight set of a component without a delta another set of it carries (`vpatch apply
    FILE` inside a pipeline writes x.no-red.safetensors beside the untouched original), and a
    folder with provenance that model_index.json does not name (`vpatch apply wan/transformer`
    writes wan/transformer-no-red/, which from_pretrained never loads). A card or a listing that
    says the concept is removed would then be wrong about what loads."""
    out = []
    for c in ck.components:
        carried = {r.delta_sha256: r for ws in c.weight_sets for r in records(ws)}
        for ws in c.weight_sets:
            have = {r.delta_sha256 for r in records(ws)}
            for sha, r in carried.items():
                if sha not in have:
                    what = (
                        "the default weights, which from_pretrained loads"
                        if ws.variant is None
                        else f"variant {ws.variant}"
                    )
                    out.append(
                        f"{r.concept} ({sha[:12]}) is not in {ws.label} ({what}), though another file of {c.folder or c.name} carries it"
                    )
    named = _pipeline_names(ck)
    if named is not None:
        for c in ck.components:
            recs = [r for ws in c.weight_sets for r in records(ws)]
            if recs and c.name not in named:
                out.append(
                    f"{c.folder} carries {recs[0].concept} ({recs[0].delta_sha256[:12]}), but"
                    f" model_index.json names no {c.name!r} component: from_pretrained never loads it"
                )
    return out


def _pipeline_names(ck: Checkpoint) -> set[str] | None:
    """The components a pipeline folder's model_index.json names (None: not a pipeline, or no
    readable index)."""
    if ck.layout != "pipeline":
        return None
    try:
        index = json.loads((ck.root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k for k, v in index.items() if isinstance(v, list)} if isinstance(index, dict) else None


def dump(recs: list[AppliedRecord]) -> str:
    return json.dumps([r.to_dict() for r in recs], separators=(",", ":"))


def with_records(meta: dict[str, str], recs: list[AppliedRecord]) -> dict[str, str]:
    """``meta`` with its ``vpatch.applied`` replaced by ``recs`` (removed when there are none)."""
    m = dict(meta)
    if recs:
        m[KEY] = dump(recs)
    else:
        m.pop(KEY, None)
    return m


def index_records(meta: dict, where: Path) -> list[AppliedRecord]:
    return parse_list(meta.get(KEY), f"{where} (index metadata)")


@dataclass(frozen=True)
class ApplyStamp:
    """The ``vpatch.applied`` record an apply adds: first the worst case (every target listed as
    diverged) to reserve header room, then the real one once every edit has been streamed."""

    plan: Plan
    worst: AppliedRecord

    def record(self, results: list[EditResult] | None) -> AppliedRecord:
        if results is None:
            return self.worst
        ck = self.plan.checkpoint
        diverged = sorted(result_tag(ck, r) for r in results if r.stats.base_match is False)
        return dataclasses.replace(self.worst, diverged=tuple(diverged))

    def meta_for(self, h: Header, results: list[EditResult] | None) -> dict[str, str]:
        recs = parse(h.metadata, str(h.path))
        return with_records(h.metadata, recs + [self.record(results)])

    def index_meta(self, meta: dict, results: list[EditResult]) -> dict:
        recs = index_records(meta, self.plan.checkpoint.root)
        meta[KEY] = [r.to_dict() for r in recs + [self.record(results)]]
        return meta


def carrying(plan: Plan) -> list[str]:
    """The weight sets the plan would edit that already carry its delta (apply refuses them, and
    an export from them would edit twice), once each, in plan order."""
    sha = plan.delta.sha256
    out: dict[str, None] = {}
    for m in plan.matched:
        for ws in m.sets:
            if any(r.delta_sha256 == sha for r in records(ws)):
                out.setdefault(ws.label, None)
    return list(out)


def applied_to(plan: Plan) -> AppliedRecord:
    dl = plan.delta
    for m in plan.matched:
        for ws in m.sets:
            for r in records(ws):
                if r.delta_sha256 == dl.sha256:
                    return r
    raise RevertError(
        f"{plan.checkpoint.root} has no record of delta {dl.sha256[:12]} ({dl.concept_name}); nothing to revert"
    )


@dataclass(frozen=True)
class RevertStamp:
    """A revert removes the delta's ``vpatch.applied`` record and keeps the others."""

    root: Path
    delta_sha256: str

    def meta_for(self, h: Header, _results: object) -> dict[str, str]:
        recs = parse(h.metadata, str(h.path))
        kept = [r for r in recs if r.delta_sha256 != self.delta_sha256]
        return with_records(h.metadata, kept)

    def index_meta(self, meta: dict, _results: object) -> dict:
        kept = [r for r in index_records(meta, self.root) if r.delta_sha256 != self.delta_sha256]
        if kept:
            meta[KEY] = [r.to_dict() for r in kept]
        else:
            meta.pop(KEY, None)
        return meta
