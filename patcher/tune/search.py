"""The search: an Optuna multi-objective study over the edit's parameters, kept in SQLite.

Each trial draws a site and a method, then the method's own parameters; it builds the delta from
the fit half of one capture (no model runs) and scores it with the cheap objectives. Optuna's
TPE sampler (seeded) proposes; the Pareto front of (concept left, damage) is what the user picks
from, and ``choose`` picks the least concept left under a damage budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..probe.build import TWIN
from ..probe.params import ProbeParams

# ranges per method: what each method reads (build.py); rank and directions are capped by the
# site's width when a trial is built
STRENGTH = (0.5, 1.5)  # λ: 1 removes (projection) or reaches the twin (twin map) exactly
RANK = (1, 128)  # k, log-uniform
ALPHA = (0.0, 4.0)  # α of cPCA
DIRECTIONS = (1, 4)  # m
BETA = (0.01, 10.0)  # the twin's preservation weight, log-uniform
NULL = (0, 4)  # the twin's null-space directions


@dataclass(frozen=True)
class Candidate:
    site: str
    params: ProbeParams

    def record(self) -> dict:
        p = self.params
        out = {"site": self.site, "method": p.method, "strength": p.strength}
        if p.method == TWIN:
            out.update(beta=p.beta, null=p.null)
            if p.scan:
                out.update(scan=p.scan)
            if p.anchor_empty:
                out.update(anchor_empty=True)
        else:
            out.update(rank=p.rank, alpha=p.alpha, directions=p.directions)
        return out


def suggest(
    trial,
    sites: list[str],
    methods: list[str],
    widths: dict[str, int],
    pooling: str,
    scan: int = 0,
    anchor: bool = False,
):
    """The trial's candidate (define-by-run: each method draws only the parameters it reads).
    SCAN > 0: a twin trial also draws whether the vocabulary scan's words join its edit; ANCHOR:
    whether the empty prompt weighs as much as every other preserved token. A site named
    ``a+b`` is two sites edited together, a twin map there fitted through the other's edit
    (``--cascade``)."""
    site = trial.suggest_categorical("site", sites)
    method = trial.suggest_categorical("method", methods)
    strength = trial.suggest_float("strength", *STRENGTH)
    if method == TWIN:
        beta = trial.suggest_float("beta", *BETA, log=True)
        null = trial.suggest_int("null", *NULL)
        n = trial.suggest_categorical("scan", [0, scan]) if scan else 0
        a = trial.suggest_categorical("anchor_empty", [False, True]) if anchor else False
        return Candidate(site, _twin(strength, pooling, beta, null, n, a, "+" in site))
    rank = 1
    alpha = 0.0
    if method in ("pca", "cpca"):
        rank = min(trial.suggest_int("rank", *RANK, log=True), widths[site])
    if method == "cpca":
        alpha = trial.suggest_float("alpha", *ALPHA)
    directions = min(trial.suggest_int("directions", *DIRECTIONS), widths[site])
    return Candidate(site, ProbeParams(method, rank, alpha, strength, directions, pooling))


def _twin(strength, pooling, beta, null, scan, anchor, cascade) -> ProbeParams:
    return ProbeParams(
        TWIN,
        1,
        0.0,
        strength,
        1,
        pooling,
        beta=beta,
        null=null,
        scan=scan,
        anchor_empty=anchor,
        cascade=cascade,
    )


def sites_of(site: str) -> tuple[str, ...]:
    """The sites a candidate edits: ``a+b`` is a and b together."""
    return tuple(site.split("+"))


def candidate_of(params: dict, pooling: str) -> Candidate:
    """A trial's candidate again from its stored parameters (widths already applied at build)."""
    m = params["method"]
    if m == TWIN:
        p = _twin(
            params["strength"],
            pooling,
            params["beta"],
            params["null"],
            params.get("scan", 0),
            params.get("anchor_empty", False),
            "+" in params["site"],
        )
    else:
        p = ProbeParams(
            m,
            params.get("rank", 1),
            params.get("alpha", 0.0),
            params["strength"],
            params.get("directions", 1),
            pooling,
        )
    return Candidate(params["site"], p)


def front(study) -> list:
    """The completed trials on the Pareto front, by concept left."""
    return sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1], t.number))


def choose(trials: list, max_damage: float):
    """The least concept left among trials with damage <= the budget (ties: less damage); when
    none is within the budget, the least damaging one (the report says so)."""
    ok = [t for t in trials if t.values[1] <= max_damage]
    if ok:
        return min(ok, key=lambda t: (t.values[0], t.values[1], t.number)), True
    return min(trials, key=lambda t: (t.values[1], t.values[0], t.number)), False
