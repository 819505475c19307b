"""Fit / validation split of a concept recipe's prompts, and the activations of each part.

The split is by content, not by position or seed: each pair (by its unsafe prompt) and each neutral
prompt is ranked by the sha256 of its text, and the lowest-ranked ``round(n * fraction)`` (at least
one, and always leaving one to fit) are held for validation. The same recipe always splits the same
way and reordering the recipe does not move a prompt across. Adding a prompt can move one other
(the count held out, ``round(n * fraction)``, may stay the same while the new prompt ranks lowest).
The recipe's ``[heldout]`` sets are never used: they stay for ``vpatch eval``. Extra preservation
prompts (the twin's ``--preserve`` file) are not split: they all serve the fit, less any that is
itself a validation prompt, so validation stays unseen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from ..errors import ProbeError
from ..probe.activations import Activations, GroupActivations

PAIR_ROLES = ("unsafe", "safe", "unsafe_ids", "safe_ids")
SCAN_ROLES = ("scan", "scan_ids")  # the vocabulary scan's substituted pairs (probe/capture.py)


def _held(texts: list[str], fraction: float) -> list[int]:
    n = len(texts)
    if n < 2:
        return []
    k = min(n - 1, max(1, round(n * fraction)))
    order = sorted(range(n), key=lambda i: hashlib.sha256(texts[i].encode()).hexdigest())
    return sorted(order[:k])


@dataclass(frozen=True)
class Split:
    fit_pairs: tuple[int, ...]
    val_pairs: tuple[int, ...]
    fit_neutral: tuple[int, ...]
    val_neutral: tuple[int, ...]
    fraction: float

    @classmethod
    def of(cls, unsafe: list[str], neutral: list[str], fraction: float = 0.4) -> Split:
        if not 0 < fraction < 1:
            raise ProbeError(f"--val-fraction {fraction!r}: must be between 0 and 1")
        vp, vn = _held(unsafe, fraction), _held(neutral, fraction)
        if not vp:
            raise ProbeError(
                "tune needs at least 2 unsafe/safe pairs in the concept recipe (one to fit, one to validate)"
            )
        return cls(
            tuple(i for i in range(len(unsafe)) if i not in vp),
            tuple(vp),
            tuple(i for i in range(len(neutral)) if i not in vn),
            tuple(vn),
            fraction,
        )

    def record(self, unsafe: list[str], neutral: list[str]) -> dict:
        return {
            "rule": "sha256 of the prompt text, lowest round(n*fraction) held for validation",
            "fraction": self.fraction,
            "validation_pairs": [unsafe[i] for i in self.val_pairs],
            "validation_neutral": [neutral[i] for i in self.val_neutral],
        }


def subset(
    acts: Activations,
    sites: tuple[str, ...] | list[str],
    pairs: tuple[int, ...] | None = None,
    neutral: tuple[int, ...] | None = None,
    unseen: tuple[str, ...] = (),
) -> Activations:
    """The activations of some sites, restricted to some pairs and neutral prompts (None: all);
    the shared roles (empty prompt, padding) are kept whole. Preservation prompts (role
    ``preserve``) that repeat a left-out pair's or neutral prompt's text, or one of UNSEEN (more
    prompts the fit must not see, e.g. tune's reach validation prompts), are dropped, and the
    vocabulary scan's prompts (a candidate word in a pair's concept word's place) go with their
    pair, so a scan fitted on the subset never reads a left-out pair's context. The candidate words
    themselves were drawn once at capture, from every pair's concept words (probe/capture.py):
    where the two halves name the concept differently, that list is not the fit half's own. The
    concept record lists the kept pairs and neutral prompts (the plan's indices refer to them)."""
    rec = acts.concept
    scan_rows, rec = _scan_subset(rec, pairs)
    out_texts = set()
    if pairs is not None:
        out_texts |= {
            t
            for i, p in enumerate(rec.get("pairs", []))
            if i not in pairs
            for t in (p["unsafe"], p["safe"])
        }
    if neutral is not None:
        out_texts |= {t for i, t in enumerate(rec.get("neutral", [])) if i not in neutral}
    out_texts |= set(unseen)
    texts = (rec.get("scan") or {}).get("preserve")
    keep_pres = None
    if isinstance(texts, list) and out_texts:
        keep_pres = [i for i, t in enumerate(texts) if t not in out_texts]
        rec = {**rec, "scan": {**rec["scan"], "preserve": [texts[i] for i in keep_pres]}}
    groups = []
    for g in acts.groups:
        if g.site not in sites:
            continue
        roles = {}
        for r, ps in g.roles.items():
            if r in PAIR_ROLES and pairs is not None:
                roles[r] = tuple(ps[i] for i in pairs)
            elif r == "neutral" and neutral is not None:
                roles[r] = tuple(ps[i] for i in neutral)
            elif r == "preserve" and keep_pres is not None:
                roles[r] = tuple(ps[i] for i in keep_pres)
            elif r in SCAN_ROLES and scan_rows is not None:
                roles[r] = tuple(ps[i] for i in scan_rows)
            else:
                roles[r] = ps
        groups.append(GroupActivations(g.site, g.input, g.targets, roles))
    if not groups:
        raise ProbeError(f"no captured group for site(s) {', '.join(sites)}")
    if pairs is not None and "pairs" in rec:
        rec = {**rec, "pairs": [rec["pairs"][i] for i in pairs]}
    if neutral is not None and "neutral" in rec:
        rec = {**rec, "neutral": [rec["neutral"][i] for i in neutral]}
    return replace(
        acts,
        sites=tuple(s for s in acts.sites if s in sites),
        groups=tuple(groups),
        concept=rec,
    )


def _scan_subset(rec: dict, pairs: tuple[int, ...] | None) -> tuple[list[int] | None, dict]:
    """The scan rows (captured in plan order: each word, then its pairs) whose pair is kept, and
    the plan with its pair indices renumbered to the kept pairs' positions (None: keep all)."""
    plan = rec.get("scan")
    if pairs is None or not isinstance(plan, dict) or "words" not in plan:
        return None, rec
    pos = {p: k for k, p in enumerate(pairs)}
    rows: list[int] = []
    kept_pairs: list[list[int]] = []
    at = 0
    for used in plan["pairs"]:
        mine = []
        for p in used:
            if int(p) in pos:
                rows.append(at)
                mine.append(pos[int(p)])
            at += 1
        kept_pairs.append(mine)
    return rows, {**rec, "scan": {**plan, "pairs": kept_pairs}}


def scan_rows_of(rec: dict, pairs: tuple[int, ...], words: list[str]) -> list[tuple[int, str, int]]:
    """(row, word, pair) of the scan prompts that put one of WORDS into one of PAIRS."""
    plan = rec.get("scan") or {}
    out = []
    at = 0
    for w, used in zip(plan.get("words", []), plan.get("pairs", [])):
        for p in used:
            if w in words and int(p) in pairs:
                out.append((at, w, int(p)))
            at += 1
    return out
