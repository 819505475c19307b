"""``ProbeParams``: the method parameters that turn captured activations into a delta.

One frozen record, checked once when it is made: the CLI and the API both build it, and a bad value
fails with one line before any model is loaded. A field left as ``None`` means "the family recipe's
default"; ``resolved`` fills those from the defaults recorded with the activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..erasure.refusal import POOLINGS
from ..errors import ProbeError

# the scan's rule (docs/erasure.md "Reach"), fixed on token-level scores before any generation: a word
# joins when 1 - d(word, concept word) / d(average word, concept word) at the site is at least this
SCAN_MIN = 0.6


def check_count(flag: str, v, what: str) -> None:
    """A whole number >= 0 (a bool is not one), else one line naming the flag."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProbeError(f"{flag} {v!r}: {what}, a whole number >= 0")


def method_names() -> tuple[str, ...]:
    from .build import METHODS

    return tuple(METHODS)


@dataclass(frozen=True)
class ProbeParams:
    method: str | None = None  # a name in build.METHODS: mean, pca, cpca, twin
    rank: int | None = None  # k: subspace size for pca/cpca
    alpha: float | None = None  # α in C = C_diff - α C_neutral (cpca)
    strength: float | None = None  # λ in W' = W - λ (W B) Bᵀ
    directions: int | None = None  # m: orthonormal directions removed
    pooling: str | None = None  # how a prompt's tokens become samples: tokens, mean, last
    # twin only (erasure/twin.py); fixed defaults, not the family's
    beta: float = 1.0  # weight of the preservation set against the concept pairs
    ridge: float = 1e-3  # pull toward the identity, relative to the preservation tokens' scale
    null: int = 0  # concept null-space directions that no input reaches afterwards
    scan: int = 0  # vocabulary scan: candidate words captured (0: none; docs/erasure.md "Reach")
    scan_min: float = SCAN_MIN  # a scanned word joins the edit when its score is at least this
    cascade: bool = False  # a site read through another edited site is fitted through that edit
    cascade_repair: bool = False  # ... with the original readings as its targets (needs cascade)
    anchor_empty: bool = False  # the empty prompt weighs as much as every other preserved token
    scan_keep: bool = False  # the scanned words the rule does not pick keep their slot's reading
    scan_keep_max: float = math.inf  # ... only those scoring below this (inf: every one)
    scan_keep_whole: bool = False  # ... every token of their substituted prompts, not the slot only

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in method_names():
            raise ProbeError(f"--method {self.method!r}: choose one of {', '.join(method_names())}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ProbeError(f"--pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        for name, what in (("rank", "k, the subspace size"), ("directions", "m, the directions")):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ProbeError(f"--{name} {v!r}: {what}, must be a whole number >= 1")
        check_count("--scan", self.scan, "candidate words")
        for name in ("cascade", "cascade_repair", "anchor_empty", "scan_keep", "scan_keep_whole"):
            if not isinstance(getattr(self, name), bool):
                raise ProbeError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: true or false"
                )
        if self.cascade_repair and not self.cascade:
            raise ProbeError("--cascade-repair: a form of --cascade; give both")
        if self.scan_keep and not self.scan:
            raise ProbeError("--scan-keep: keeps the words a --scan did not pick; give --scan N")
        v = self.scan_keep_max
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or (v != math.inf and not math.isfinite(v))
        ):
            raise ProbeError(f"--scan-keep-max {v!r}: a scan score, must be a finite number")
        if v != math.inf and not self.scan_keep:
            raise ProbeError("--scan-keep-max: a bound of --scan-keep; give both")
        if self.scan_keep_whole and not self.scan_keep:
            raise ProbeError("--scan-keep-whole: a form of --scan-keep; give both")
        check_count("--null", self.null, "null-space directions")
        for name, low, what in (
            ("alpha", ">= 0", "the neutral contrast α"),
            ("beta", ">= 0", "the twin's preservation weight β"),
            ("ridge", ">= 0", "the twin's pull toward the identity"),
            ("scan_min", "> 0", "the scan's score a word needs to join the edit"),
            ("strength", "> 0", "the edit strength λ (1 removes the direction exactly)"),
        ):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ProbeError(f"--{name} {v!r}: {what}, must be a finite number {low}")
            if (v < 0) if low == ">= 0" else (v <= 0):
                raise ProbeError(f"--{name} {v!r}: {what}, must be {low}")

    def resolved(self, defaults: dict) -> ProbeParams:
        """Every unset field taken from ``defaults`` (a family recipe's), checked again as a whole."""
        missing = {
            f.name: defaults.get(f.name) for f in fields(self) if getattr(self, f.name) is None
        }
        absent = [k for k, v in missing.items() if v is None]
        if absent:
            raise ProbeError(f"no value and no family default for {', '.join(absent)}")
        return replace(self, **missing)

    def record(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
