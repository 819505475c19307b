"""Planning: match every delta entry to the stored tensor it edits, before anything is written.

``plan_apply`` returns a ``Plan``: per entry, where it lands (which file, stored key, row block of a
fused tensor) or why it does not, and the planned ``EditOp``s (``Plan.ops()``), the value that
``apply``, ``revert`` and an adapter export consume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import CONVERT_HINT, Checkpoint, Component, WeightSet, open_checkpoint
from ..dtypes import codec_for, dtype_refusal
from ..errors import CompatibilityError, DeltaError, DtypeError, PickleRefused
from ..layouts import AliasRules, Location, resolve, rules_for
from ..safetensors_io import Header, TensorReader, row_blocks
from ..vud.delta import Delta, DeltaEntry, read_delta
from . import kernel
from .ops import MAP, RECOMPUTED, EditOp

BASE_RSS = 300 << 20  # interpreter + torch, and the headers of up to HEADER_FREE tensors
HEADER_FREE = 10_000
HEADER_BYTES = 2 << 10  # per parsed tensor entry beyond that (measured: about 1.2 KiB)
MAX_STRENGTH = 1e6  # |strength| above this is refused, from the command line or from a delta


@dataclass
class Match:
    """How one delta entry resolved: ``matched`` with its locations, or why not."""

    entry: DeltaEntry
    status: str  # matched | missing | shape | dtype | other-component
    note: str = ""
    sets: list[WeightSet] = field(default_factory=list)
    locs: list[Location] = field(default_factory=list)  # where the entry is in each of ``sets``
    dtype: str | None = None
    base_match: bool | None = None  # target bytes == the delta's base fingerprint

    def files(self) -> list[Path]:
        return [ws.key_file[loc.key] for ws, loc in zip(self.sets, self.locs)]


def base_difference(m: Match) -> str:
    """' (stored as X, probed from Y)' when the target's dtype is not the probed base's (its bytes
    then differ although the weights may be the same), else ''."""
    if m.entry.base_dtype not in (None, m.dtype):
        return f" (stored as {m.dtype}, probed from {m.entry.base_dtype})"
    return ""


@dataclass
class Plan:
    checkpoint: Checkpoint
    delta: Delta
    component: str | None
    how: str  # how the component was chosen
    matches: list[Match]
    strength: float
    use_factors: bool
    _ops: tuple[EditOp, ...] | None = field(default=None, repr=False)

    @property
    def in_scope(self) -> list[Match]:
        return [m for m in self.matches if m.status != "other-component"]

    @property
    def matched(self) -> list[Match]:
        return [m for m in self.matches if m.status == "matched"]

    def ops(self) -> tuple[EditOp, ...]:
        """Every planned edit, grouped by file and stored key (the row blocks of a fused tensor
        are consecutive); each tensor's codec (fp8 scale) is read once."""
        if self._ops is None:
            by_file: dict[Path, dict[str, list[tuple[Location, Match, WeightSet]]]] = {}
            for m in self.matched:
                for ws, loc in zip(m.sets, m.locs):
                    f = ws.key_file[loc.key]
                    by_file.setdefault(f, {}).setdefault(loc.key, []).append((loc, m, ws))
            ops: list[EditOp] = []
            for f, keys in by_file.items():
                for key, hits in keys.items():
                    codec = codec_for(hits[0][2], key)
                    for loc, m, ws in hits:
                        ops.append(self._op(f, key, loc, m, ws, codec))
            self._ops = tuple(ops)
        return self._ops

    def _op(self, f: Path, key: str, loc: Location, m: Match, ws: WeightSet, codec) -> EditOp:
        e = m.entry
        recompute = e.kind in RECOMPUTED and not self.use_factors
        return EditOp(
            entry=e.key,
            kind=e.kind,
            file=f,
            key=key,
            rows=loc.rows,
            shape=e.shape,
            dtype=ws.dtype(key),
            codec=codec,
            U=e.U,
            V=e.V,
            strength=e.strength * self.strength if recompute else self.strength,
            recompute=recompute,
            base_sha256=e.base_sha256,
            base_dtype=e.base_dtype,
            P=e.P if recompute and e.kind == MAP else None,
        )

    def edited_bytes(self) -> int:
        """Bytes of every edited tensor or row block, from the headers (nothing is read)."""
        tot = 0
        for m in self.matched:
            for ws, loc in zip(m.sets, m.locs):
                t = ws.headers[ws.key_file[loc.key]].tensors[loc.key]
                row = t.nbytes // max(1, t.shape[0])
                tot += row * (loc.rows[1] - loc.rows[0]) if loc.rows else t.nbytes
        return tot

    def weight_set(self, f: Path) -> WeightSet:
        for ws in self.checkpoint.weight_sets:
            if f in ws.headers:
                return ws
        raise KeyError(f)

    def header(self, f: Path) -> Header:
        return self.weight_set(f).headers[f]

    def peak_estimate(self) -> int:
        worst = 0
        for m in self.matched:
            out, inn = m.entry.shape
            block = min(out * inn * 4, max(inn * 4, kernel.ROW_BLOCK_BYTES))
            factors = (out + inn) * m.entry.rank * 4 * 2
            worst = max(worst, 5 * block + factors)
        entries = sum(
            len(h.tensors) for ws in self.checkpoint.weight_sets for h in ws.headers.values()
        )
        return BASE_RSS + worst + max(0, entries - HEADER_FREE) * HEADER_BYTES

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
        if component is not None:
            raise CompatibilityError(
                f"--component {component}: {ck.root} is a pipeline folder, where each entry goes to its"
                " own component's subfolder; --component says which component a bare file or"
                " folder is, so leave it out here"
            )
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


def fingerprint(ws: WeightSet, loc: Location) -> str:
    """sha256 of a tensor's (or a fused tensor's row block's) stored bytes."""
    h = ws.headers[ws.key_file[loc.key]]
    t = h.tensors[loc.key]
    a, b = loc.rows or (0, t.shape[0])
    digest = hashlib.sha256()
    with TensorReader(h) as rd:
        for r0, r1 in row_blocks((b - a, *t.shape[1:]), kernel.ROW_BLOCK_BYTES):
            digest.update(rd.raw_rows(loc.key, a + r0, a + r1))
    return digest.hexdigest()


def check_strength(strength: float, what: str = "--strength") -> None:
    if not (strength == strength) or abs(strength) > MAX_STRENGTH:
        raise CompatibilityError(f"{what} {strength} is not a usable number")


def _match(e: DeltaEntry, ck: Checkpoint, chosen: str | None, rules: AliasRules) -> Match:
    """Where one entry lands in every weight set of its component, or why it does not."""
    if ck.layout != "pipeline" and chosen is not None and e.component != chosen:
        return Match(e, "other-component", f"entry is for {e.component}")
    comp = _sets_for(ck, e.component)
    if comp is not None and comp.pickle_files:
        name = comp.pickle_files[0].name
        raise PickleRefused(
            f"{comp.folder} holds pickle weights ({name}) beside the safetensors ones; they would stay unpatched and could be loaded instead. Delete or convert them first"
            if comp.weight_sets
            else f"{comp.folder} holds only pickle weights ({name}). {CONVERT_HINT}"
        )
    if comp is None or not comp.weight_sets:
        return Match(e, "missing", f"no {e.component}/ weights in the checkpoint")
    m = Match(e, "matched")
    resolved = [(ws, *resolve(e.tensor_key, e.shape, ws, rules)) for ws in comp.weight_sets]
    found = [ws for ws, _status, loc, _note in resolved if loc is not None]
    for ws, status, loc, note in resolved:
        if loc is None:
            m.status, m.note = status, note
            if found and status == "missing":
                extra, has = Path(ws.label).name, Path(found[0].label).name
                m.note = (
                    f"{has} has it but {extra} does not: every weight file of a component folder is"
                    f" taken as a variant of the same weights; move {extra} out of {comp.folder}"
                )
            break
        m.sets.append(ws)
        m.locs.append(loc)
        m.dtype = ws.dtype(loc.key)
        refusal = dtype_refusal(ws, loc.key)
        if refusal:
            m.status, m.note = "dtype", f"{loc.key} in {ws.label}: {refusal}"
            break
    return m


def _refuse_overlaps(matches: list[Match]) -> None:
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


def _refuse_unfit(plan: Plan, allow_partial: bool) -> None:
    bad_dtype = [m for m in plan.matches if m.status == "dtype"]
    if bad_dtype:
        raise DtypeError(
            f"{bad_dtype[0].note} ({len(bad_dtype)} targeted tensor(s) affected; nothing was written)"
        )
    cov = plan.coverage()
    if plan.matched and (cov["matched"] == cov["expected"] or allow_partial):
        return
    first = [
        f"{m.entry.key} ({m.note})" if m.note else m.entry.key
        for m in plan.in_scope
        if m.status == "missing"
    ][:2] or cov["shape_mismatch"][:2]
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
    """Match every delta entry to a tensor; raise with a coverage report unless all are found.

    The returned plan's ``ops()`` are the edits to make (``EditOp``); ``fingerprints`` also compares
    each target's bytes with the delta's base sha256 now (a real apply does it while streaming)."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint, revision)
    dl = delta if isinstance(delta, Delta) else read_delta(delta)
    check_strength(strength)
    for e in dl.entries:
        if not abs(e.strength) <= MAX_STRENGTH:
            raise DeltaError(
                f"{e.key}: the delta's stored strength {e.strength} is outside ±{MAX_STRENGTH:g}, the bound --strength has; the delta is damaged or was not written by vpatch"
            )
    rules = rules_for(dl.method.get("family") if isinstance(dl.method, dict) else None)
    chosen, how = _choose_component(ck, dl, component, rules)
    matches = [_match(e, ck, chosen, rules) for e in dl.entries]
    _refuse_overlaps(matches)
    plan = Plan(ck, dl, chosen, how, matches, float(strength), use_factors)
    _refuse_unfit(plan, allow_partial)
    if fingerprints:
        for m in plan.matched:
            if m.entry.base_sha256 is not None:
                m.base_match = all(
                    fingerprint(ws, loc) == m.entry.base_sha256 for ws, loc in zip(m.sets, m.locs)
                )
    return plan
