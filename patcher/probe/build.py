"""Build: captured activations + method parameters -> a delta, without running any model.

A method is a function ``(activations, params, weights) -> Built``: it reads the captures it needs
(pooled pairs, token-level pairs, neutral or preservation prompts) and returns delta entries plus a
per-group summary. ``METHODS`` maps the names ``--method`` accepts to those functions; a new edit
form is one more function and one more name. The math itself lives in ``erasure/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..erasure.refusal import pair_differences, pool, refusal_directions
from ..errors import ProbeError
from ..vud.delta import Delta, DeltaEntry, projection_entry, versions
from .activations import Activations, GroupActivations
from .params import ProbeParams
from .sources import WeightReader


@dataclass(frozen=True)
class GroupResult:
    site: str
    component: str
    input: str  # what the directions were computed on
    dim: int
    samples: int
    kept: float
    targets: list[str]


@dataclass(frozen=True)
class Built:
    """A built delta and, per group, what its directions came from."""

    delta: Delta
    groups: list[GroupResult]

    def to_dict(self) -> dict:
        return {"method": self.delta.method, "groups": [asdict(g) for g in self.groups]}


Method = Callable[
    [Activations, ProbeParams, WeightReader], tuple[list[DeltaEntry], list[GroupResult]]
]


def _no_empty_prompt(g: GroupActivations) -> None:
    for ps in g.roles.values():
        for p in ps:
            if any(c.tokens.shape[0] == 0 for c in p):
                raise ProbeError(
                    f"site {g.site} ({g.input}): a prompt has no valid tokens after masking"
                )


def refusal_projection(
    acts: Activations, params: ProbeParams, weights: WeightReader
) -> tuple[list[DeltaEntry], list[GroupResult]]:
    """The paper's edit: per group, the refusal direction(s) B from the pair differences (mean, or
    kept by a pca/cpca subspace), then W' = W - λ (W B) Bᵀ on every target that reads the group."""
    entries: list[DeltaEntry] = []
    results: list[GroupResult] = []
    for g in acts.groups:
        _no_empty_prompt(g)
        samples = [
            torch.cat(
                [pair_differences(xu, None, xs, None, params.pooling) for xu, xs in zip(cu, cs)]
            )
            for cu, cs in zip(g.calls("unsafe"), g.calls("safe"))
        ]
        neutral = None
        if params.method == "cpca":
            xs = [x for p in g.calls("neutral") for x in p] if "neutral" in g.roles else []
            if not xs:
                raise ProbeError(
                    f"site {g.site} ({g.input}): cpca needs neutral captures; none were saved"
                )
            neutral = torch.cat([pool(x, None, params.pooling) for x in xs])
        try:
            d = refusal_directions(
                samples,
                neutral,
                method=params.method,
                rank=params.rank,
                alpha=params.alpha,
                directions=params.directions,
            )
        except ValueError as e:
            raise ProbeError(f"site {g.site} ({g.input}): {e}") from None
        for t in g.targets:
            W = weights.target(t)
            entries.append(
                projection_entry(t.delta_key, W, d.B, params.strength, t.sha256, t.dtype)
            )
        results.append(
            GroupResult(
                g.site,
                g.targets[0].component,
                g.input,
                int(d.B.shape[0]),
                d.samples,
                round(d.kept, 4),
                [t.key for t in g.targets],
            )
        )
    return entries, results


METHODS: dict[str, Method] = {
    "cpca": refusal_projection,  # contrastive subspace: C_diff - α C_neutral
    "pca": refusal_projection,  # α = 0
    "mean": refusal_projection,  # the raw mean difference
}


def build(
    acts: Activations, params: ProbeParams | None = None, weights: WeightReader | None = None
) -> Built:
    """The delta for these parameters (unset ones from the family's defaults) and its summary.

    ``weights`` gives the base weights (pass one reader to many builds: each W is read once); by
    default the model the activations were captured from is reopened.
    """
    p = (params or ProbeParams()).resolved(acts.defaults)
    reader = weights or WeightReader.for_activations(acts)
    entries, groups = METHODS[p.method](acts, p, reader)
    c = acts.capture
    method_rec = {
        "name": p.method,
        "rank": p.rank,
        "alpha": p.alpha,
        "strength": p.strength,
        "directions": p.directions,
        "pooling": p.pooling,
        "family": acts.family,
        "sites": list(acts.sites),
        "layer_filter": c.layer_filter,
        "seed": c.seed,
        "device": c.device,
        "dtype": c.dtype,
        "denoise_steps": c.denoise_steps,
        "overrides": list(c.overrides),
    }
    return Built(Delta(entries, acts.concept, method_rec, versions()), groups)


def build_delta(
    acts: Activations, params: ProbeParams | None = None, weights: WeightReader | None = None
) -> Delta:
    """``build(...).delta``: the delta alone."""
    return build(acts, params, weights).delta
