"""Several concepts in one delta: ``merge_deltas`` unites the entries of deltas already made.

Where two concepts edit the same weight, the result is one projection onto the complement of their
joint span: the directions of every concept are orthonormalised once (an SVD of [B_a | B_b]), so the
merged edit is W' = W − λ (W Q) Qᵀ with Q spanning both. A chain of rank-1 projections along
non-orthogonal directions is not that projection (it depends on the order and lets part of the first
direction back in). Where they edit different weights the entries are simply united.

Twin edits (``map_input``: W' = W M) combine by composition instead, in the order the deltas are
given: the merged entry is W' = W M_1 M_2 … M_n, exactly what applying the deltas one after the other
makes (each recomputes its U from the weight it is applied to). M_i − I is low rank, so the product
minus I is too (rank ≤ Σ r_i); it is stored as one ``map_input`` entry. A projection entry on the same
weight is the map I − λ B Bᵀ and composes the same way.

Which concepts edit which entry is recorded in the delta's concept metadata
(``concept["concepts"]`` and ``concept["entries"]``), so ``inspect`` can list it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DeltaError
from .delta import Delta, DeltaEntry, read_delta, versions

SPAN_TOL = 1e-6  # singular values below this (relative) are directions already in the span


def concept_names(delta: Delta) -> list[str]:
    """Every concept a delta removes, in order (one for a probed delta, several for a merged one)."""
    sub = delta.concept.get("concepts") if isinstance(delta.concept, dict) else None
    if isinstance(sub, list) and sub:
        return [str(c.get("name", "unnamed")) if isinstance(c, dict) else str(c) for c in sub]
    return [delta.concept_name]


def entry_concepts(delta: Delta) -> dict[str, list[str]]:
    """Delta key -> the concepts that edit it."""
    recorded = delta.concept.get("entries") if isinstance(delta.concept, dict) else None
    names = concept_names(delta)
    out: dict[str, list[str]] = {}
    for e in delta.entries:
        got = recorded.get(e.key) if isinstance(recorded, dict) else None
        out[e.key] = [str(n) for n in got] if isinstance(got, list) and got else list(names)
    return out


def slug(name: str) -> str:
    """A concept name as a file-name part: lower case, [a-z0-9._-] only."""
    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return s or "concept"


@dataclass(frozen=True)
class MergeReport:
    output: str | None
    delta_sha256: str
    concepts: list[str]
    entries: int
    joint: list[dict]  # per shared key: concepts, rank before/after orthonormalisation

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "delta_sha256": self.delta_sha256,
            "concepts": self.concepts,
            "entries": self.entries,
            "joint": self.joint,
        }


def joint_basis(Bs: list[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis of the span of every column of ``Bs`` (one SVD, float64)."""
    M = torch.cat([B.to(torch.float64) for B in Bs], 1)
    Q, S, _ = torch.linalg.svd(M, full_matrices=False)
    keep = S > SPAN_TOL * float(S.max())
    return Q[:, keep]


def _merge_projection(key: str, parts: list[tuple[str, DeltaEntry]]) -> DeltaEntry:
    lams = {round(e.strength, 9) for _, e in parts}
    if len(lams) != 1:
        raise DeltaError(
            f"{key}: the concepts {', '.join(n for n, _ in parts)} were probed with different strengths λ "
            f"({', '.join(f'{e.strength:g}' for _, e in parts)}); one joint projection needs one λ. Re-probe with the same --strength"
        )
    lam = parts[0][1].strength
    shas = {e.base_sha256 for _, e in parts}
    dtypes = {e.base_dtype for _, e in parts}
    Bs = [e.V for _, e in parts]
    Q = joint_basis(Bs)
    # U = −λ W Q. W Q follows from the stored factors when they come from the same base:
    # U_i = −λ W B_i, so −λ W [B_1 … B_n] = [U_1 … U_n], and Q = [B_1 … B_n] P Σ⁻¹ from the SVD.
    M = torch.cat([B.to(torch.float64) for B in Bs], 1)
    Ucat = torch.cat([e.U.to(torch.float64) for _, e in parts], 1)
    coef = torch.linalg.lstsq(M, Q).solution  # M coef = Q exactly (Q lies in the span of M)
    U = (Ucat @ coef).to(torch.float32)
    return DeltaEntry(
        key,
        parts[0][1].shape,
        "project_input",
        float(lam),
        U,
        Q.to(torch.float32).contiguous(),
        shas.pop() if len(shas) == 1 else None,
        dtypes.pop() if len(dtypes) == 1 else None,
    )


def _input_factors(e: DeltaEntry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, WA) with the entry's input map M = I + A Bᵀ and W A its stored U (float64)."""
    if e.kind == "map_input":
        assert e.P is not None
        A = float(e.strength) * e.P.to(torch.float64)
    else:  # project_input: M = I − λ B Bᵀ, stored U = −λ W B
        A = -float(e.strength) * e.V.to(torch.float64)
    return A, e.V.to(torch.float64), e.U.to(torch.float64)


def compose_maps(
    factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, Q, W P) with I + P Qᵀ = Π_i (I + A_i B_iᵀ) in the given order, Q orthonormal.

    Never forms an H × H matrix: (I + L Rᵀ)(I + A Bᵀ) − I = [L, A + L (Rᵀ A)] [R, B]ᵀ, then one QR of
    the right factor and one SVD of the left drop the directions the product no longer uses."""
    L, R, WL = factors[0]
    for A, B, WA in factors[1:]:
        c = R.T @ A
        L, WL, R = (
            torch.cat([L, A + L @ c], 1),
            torch.cat([WL, WA + WL @ c], 1),
            torch.cat([R, B], 1),
        )
    Qr, Rr = torch.linalg.qr(R)
    L, WL = L @ Rr.T, WL @ Rr.T
    U, S, Vh = torch.linalg.svd(L, full_matrices=False)
    if float(S.max()) == 0.0:
        raise DeltaError("the composed edit is the identity: the deltas undo each other")
    keep = S > SPAN_TOL * float(S.max())
    P = U[:, keep] * S[keep]
    Q = Qr @ Vh[keep].T
    return P, Q, WL @ Vh[keep].T


def _merge_maps(key: str, parts: list[tuple[str, DeltaEntry]]) -> DeltaEntry:
    shas = {e.base_sha256 for _, e in parts}
    if len(shas) > 1:
        raise DeltaError(
            f"{key}: the deltas were probed on different base weights (sha256 "
            f"{', '.join(str(s)[:12] for s in shas)}); composing their edits needs one base"
        )
    dtypes = {e.base_dtype for _, e in parts}
    P, Q, WP = compose_maps([_input_factors(e) for _, e in parts])
    return DeltaEntry(
        key,
        parts[0][1].shape,
        "map_input",
        1.0,
        WP.to(torch.float32),
        Q.to(torch.float32).contiguous(),
        shas.pop(),
        dtypes.pop() if len(dtypes) == 1 else None,
        P.to(torch.float32),
    )


def _merge_add(key: str, parts: list[tuple[str, DeltaEntry]]) -> DeltaEntry:
    U = torch.cat([e.U for _, e in parts], 1)
    V = torch.cat([e.V for _, e in parts], 1)
    if U.shape[1] > min(parts[0][1].shape):
        raise DeltaError(f"{key}: the merged rank {U.shape[1]} exceeds the weight's size")
    shas = {e.base_sha256 for _, e in parts}
    dtypes = {e.base_dtype for _, e in parts}
    return DeltaEntry(
        key,
        parts[0][1].shape,
        "add",
        1.0,
        U,
        V,
        shas.pop() if len(shas) == 1 else None,
        dtypes.pop() if len(dtypes) == 1 else None,
    )


def merge_deltas(deltas: list[Delta | str | Path]) -> Delta:
    """One delta that removes every concept of ``deltas`` (see the module docstring)."""
    ds = [d if isinstance(d, Delta) else read_delta(d) for d in deltas]
    if len(ds) < 2:
        raise DeltaError("merge needs two or more deltas")
    seen_sha: dict[str, int] = {}
    for i, d in enumerate(ds):
        if d.sha256 in seen_sha:
            raise DeltaError(
                f"delta {i + 1} is the same as delta {seen_sha[d.sha256] + 1} ({d.sha256[:12]}); merging it twice would double nothing but its name"
            )
        seen_sha[d.sha256] = i
    by_key: dict[str, list[tuple[str, DeltaEntry]]] = {}
    owners: dict[str, list[str]] = {}
    for d in ds:
        per_entry = entry_concepts(d)
        for e in d.entries:
            by_key.setdefault(e.key, []).append((d.concept_name, e))
            owners.setdefault(e.key, []).extend(
                n for n in per_entry[e.key] if n not in owners.get(e.key, [])
            )
    entries: list[DeltaEntry] = []
    for key, parts in by_key.items():
        shapes = {e.shape for _, e in parts}
        if len(shapes) != 1:
            raise DeltaError(
                f"{key}: the deltas disagree on its shape ({', '.join(map(str, shapes))}); they are for different models"
            )
        if len(parts) == 1:
            entries.append(parts[0][1])
            continue
        kinds = {e.kind for _, e in parts}
        if "map_input" in kinds and "add" not in kinds:
            entries.append(_merge_maps(key, parts))
        elif "map_input" in kinds:
            raise DeltaError(
                f"{key}: one delta maps its input (a twin edit) and another adds to it; an additive "
                "edit does not compose with an input-side map into one entry"
            )
        elif kinds == {"project_input"}:
            entries.append(_merge_projection(key, parts))
        elif kinds == {"add"}:
            entries.append(_merge_add(key, parts))
        else:
            raise DeltaError(
                f"{key}: one delta projects it and another adds to it; a projection and an additive edit do not combine into one entry"
            )
    families = {d.method.get("family") for d in ds if isinstance(d.method, dict)}
    if len(families) > 1:
        raise DeltaError(
            f"the deltas are for different model families ({', '.join(sorted(map(str, families)))})"
        )
    names: list[str] = []
    for d in ds:
        names += [n for n in concept_names(d) if n not in names]
    subs: list[dict] = []
    for d in ds:
        sub = d.concept.get("concepts") if isinstance(d.concept, dict) else None
        subs += sub if isinstance(sub, list) and sub else [d.concept]
    concept = {
        "name": "+".join(names),
        "concepts": subs,
        "entries": owners,
        "merged_from": [d.sha256 for d in ds],
    }
    method = {
        "name": "merge",
        "family": families.pop() if families else None,
        "parts": [d.method for d in ds],
    }
    return Delta(entries, concept, method, versions())


def merge_files(deltas: list[str | Path], out: str | Path, overwrite: bool = False) -> MergeReport:
    """Merge delta files and write the result (atomically, never over an input)."""
    from .delta import write_delta

    out = Path(out)
    for d in deltas:
        if Path(d).exists() and out.exists() and out.resolve() == Path(d).resolve():
            raise DeltaError(f"output {out} is one of the inputs; choose another -o")
    merged = merge_deltas(list(deltas))
    digest = write_delta(out, merged, overwrite=overwrite)
    owners = merged.concept["entries"]
    joint = []
    for e in merged.entries:
        if len(owners[e.key]) > 1:
            joint.append({"key": e.key, "concepts": owners[e.key], "rank": e.rank})
    return MergeReport(str(out), digest, concept_names(merged), len(merged.entries), joint)


def stacking_conflicts(plan) -> list[str]:
    """Entries of ``plan`` whose target an earlier vpatch delta has already edited.

    Applying a second delta on top of the first gives W(I − λP_a)(I − λP_b), not the projection onto
    the complement of the joint span (part of u_a comes back when u_a and u_b are not orthogonal).
    A target is known untouched when its bytes still equal the delta's base fingerprint; one without
    a fingerprint counts as touched. Only checkpoints that carry another delta's record are read."""
    from ..merge import provenance
    from ..merge.plan import fingerprint

    sha = plan.delta.sha256
    earlier = {
        r.delta_sha256
        for m in plan.matched
        for ws in m.sets
        for r in provenance.records(ws)
        if r.delta_sha256 != sha
    }
    if not earlier:
        return []
    out = []
    for m in plan.matched:
        fp = m.entry.base_sha256
        if fp is None or any(fingerprint(ws, loc) != fp for ws, loc in zip(m.sets, m.locs)):
            out.append(m.entry.key)
    return out
