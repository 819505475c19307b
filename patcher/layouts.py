"""Where a delta entry lives in a checkpoint as users actually hold it.

A delta names weights by their diffusers key. A single file may carry a wrapper prefix
(``model.diffusion_model.``), an original research layout may rename the weight (Wan's
``cross_attn.k``), or fuse it with its siblings (HunyuanVideo's ``txt_attn_qkv``), where the entry is
one row block. The rules are data, in each family recipe's ``[aliases]``; this module only applies
them, so ``apply`` and ``inspect --delta`` resolve identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import WeightSet
from .families.recipes import Family, Rename, shipped_families


@dataclass(frozen=True)
class Location:
    key: str  # the stored key
    rows: tuple[int, int] | None = (
        None  # the entry's row block of a fused tensor; None: the whole tensor
    )
    how: str = "exact"  # how the key was found, for reports

    def label(self) -> str:
        return self.key if self.rows is None else f"{self.key}[{self.rows[0]}:{self.rows[1]}]"


@dataclass
class AliasRules:
    prefixes: list[str] = field(default_factory=list)
    renames: list[Rename] = field(default_factory=list)
    source: str = "none"

    def strip(self, key: str) -> tuple[str, str]:
        for p in sorted(self.prefixes, key=len, reverse=True):
            if key.startswith(p):
                return key[len(p) :], p
        return key, ""

    def candidates(self, key: str) -> list[tuple[str, Rename | None, str]]:
        """(stored key, rename or None, how) in the order they are tried: as written, without a
        prefix, with each prefix, then each rename with and without each prefix."""
        base, _ = self.strip(key)
        out: list[tuple[str, Rename | None, str]] = [(key, None, "exact")]
        if base != key:
            out.append((base, None, f"without prefix {key[: len(key) - len(base)]!r}"))
        out += [(p + base, None, f"prefix {p!r}") for p in self.prefixes]
        for r in self.renames:
            stored = r.apply(base)
            if stored is None:
                continue
            what = f"{r.layout} layout" + (
                f", fused rows part {r.part} of {list(r.split)}" if r.split else ""
            )
            out.append((stored, r, what))
            out += [(p + stored, r, f"{what}, prefix {p!r}") for p in self.prefixes]
        seen: set[str] = set()
        return [c for c in out if not (c[0] in seen or seen.add(c[0]))]


def family_rules(fam: Family) -> AliasRules:
    return AliasRules(list(fam.key_prefixes), list(fam.key_renames), fam.name)


def rules_for(family: str | None) -> AliasRules:
    """The delta's family's rules when it is a shipped one; otherwise every shipped family's."""
    fams = shipped_families()
    named = [fm for fm in fams if fm.name == family]
    if named:
        return family_rules(named[0])
    rules = AliasRules(source="all families")
    for fm in fams:
        rules.prefixes += [p for p in fm.key_prefixes if p not in rules.prefixes]
        rules.renames += fm.key_renames
    return rules


def resolve(
    key: str, shape: tuple[int, int], ws: WeightSet, rules: AliasRules
) -> tuple[str, Location | None, str]:
    """``(status, location, note)``: status is matched | missing | shape. The first candidate key
    present in the weight set decides."""
    out_dim, in_dim = shape
    for stored, rename, how in rules.candidates(key):
        have = ws.shape(stored)
        if have is None:
            continue
        if rename is None or rename.split is None:
            if have != tuple(shape):
                return (
                    "shape",
                    None,
                    f"{ws.label} has {stored} {list(have)}, delta expects {list(shape)}",
                )
            return "matched", Location(stored, None, how), ""
        if len(have) != 2 or have[1] != in_dim:
            return (
                "shape",
                None,
                f"{ws.label} has fused {stored} {list(have)}; the entry needs {in_dim} columns",
            )
        rows = rename.rows(out_dim, have[0])
        if rows is None:
            return (
                "shape",
                None,
                f"{ws.label} has fused {stored} with {have[0]} rows, which split {list(rename.split)} with out={out_dim} does not fit",
            )
        return "matched", Location(stored, rows, how), ""
    return "missing", None, f"no tensor {key} (or any alias of it) in {ws.label}"
