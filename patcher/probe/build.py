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
from ..erasure.twin import TWIN, TwinParams, twin_edit
from ..errors import ProbeError
from ..vud.delta import Delta, DeltaEntry, map_input_entry, projection_entry, versions
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


def _with_ids(g: GroupActivations, role: str) -> list[tuple[torch.Tensor, list[int]]]:
    """Each prompt of ROLE: its valid tokens (n, H) and their token ids (from ROLE_ids)."""
    return [
        (p[0].tokens.double(), [int(v) for v in ids[0].tokens[:, 0].tolist()])
        for p, ids in zip(g.roles[role], g.roles[f"{role}_ids"])
    ]


def twin_map(
    acts: Activations,
    params: ProbeParams,
    weights: WeightReader,
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[list[DeltaEntry], list[GroupResult]]:
    """The twin edit (erasure/twin.py): per group, one input-side operator M fitted on the pairs
    aligned token by token (a concept word is sent to what padding reads, or to the learned null
    caption's row at its position), with the neutral prompts, the safe twins, the empty prompt and
    padding (or the null caption) preserved; every target gets W' = W M.

    ``extra`` maps a site name to more edit rows (X, T) for its group (hardening against an
    attack: the inputs it found and the twin's reading as their target)."""
    from .capture import TWIN_ROLES

    entries: list[DeltaEntry] = []
    results: list[GroupResult] = []
    for g in acts.groups:
        missing = [r for r in TWIN_ROLES if r not in g.roles]
        if missing:
            raise ProbeError(
                f"site {g.site} ({g.input}): twin needs the token captures {', '.join(missing)}; "
                "capture with probe --method twin (--save-activations keeps them)"
            )

        preserve = [c.tokens for r in ("neutral", "safe", "empty") for p in g.roles[r] for c in p]
        # a learned null caption (recipe key null_caption) is what a removed word and the
        # unconditional branch read there, position by position; else padding's one reading
        pad = g.roles["null"][0][0].tokens if "null" in g.roles else g.roles["pad"][0][0].tokens[0]
        tp = TwinParams(beta=params.beta, ridge=params.ridge, null=params.null)
        try:
            op, info = twin_edit(
                _with_ids(g, "unsafe"),
                _with_ids(g, "safe"),
                preserve,
                pad,
                tp,
                (extra or {}).get(g.site),
            )
        except (ValueError, RuntimeError) as e:
            raise ProbeError(f"site {g.site} ({g.input}): twin edit failed: {e}") from None
        for t in g.targets:
            W = weights.target(t)
            entries.append(
                map_input_entry(t.delta_key, W, op.P, op.Q, params.strength, t.sha256, t.dtype)
            )
        results.append(
            GroupResult(
                g.site,
                g.targets[0].component,
                g.input,
                g.dim,
                info["edit_tokens"],
                round(1.0 - info["residual"], 4),
                [t.key for t in g.targets],
            )
        )
    return entries, results


TOKEN_METHODS = (TWIN,)  # methods that need CaptureOptions.token_roles

METHODS: dict[str, Method] = {
    "cpca": refusal_projection,  # contrastive subspace: C_diff - α C_neutral
    "pca": refusal_projection,  # α = 0
    "mean": refusal_projection,  # the raw mean difference
    TWIN: twin_map,  # the concept's tokens mapped to its safe twin's, with a preservation set
}


def build(
    acts: Activations,
    params: ProbeParams | None = None,
    weights: WeightReader | None = None,
    *,
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Built:
    """The delta for these parameters (unset ones from the family's defaults) and its summary.

    ``weights`` gives the base weights (pass one reader to many builds: each W is read once); by
    default the model the activations were captured from is reopened. ``extra``: per site, more
    edit rows (X, T) for the twin method (see ``twin_map``); other methods refuse it.
    """
    p = (params or ProbeParams()).resolved(acts.defaults)
    reader = weights or WeightReader.for_activations(acts)
    if extra:
        if p.method != TWIN:
            raise ProbeError(f"extra edit rows need --method {TWIN}, not {p.method}")
        unknown = sorted(set(extra) - {g.site for g in acts.groups})
        if unknown:
            raise ProbeError(f"extra edit rows for sites that were not captured: {unknown}")
        entries, groups = twin_map(acts, p, reader, extra)
    else:
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
    if p.method == TWIN:
        method_rec.update(beta=p.beta, ridge=p.ridge, null=p.null)
    return Built(Delta(entries, acts.concept, method_rec, versions()), groups)


def build_delta(
    acts: Activations, params: ProbeParams | None = None, weights: WeightReader | None = None
) -> Delta:
    """``build(...).delta``: the delta alone."""
    return build(acts, params, weights).delta
