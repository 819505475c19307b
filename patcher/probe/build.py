"""Build: captured activations + method parameters -> a delta, without running any model.

A method is a function ``(activations, params, weights) -> Built``: it reads the captures it needs
(pooled pairs, token-level pairs, neutral or preservation prompts) and returns delta entries plus a
per-group summary. ``METHODS`` maps the names ``--method`` accepts to those functions; a new edit
form is one more function and one more name. The math itself lives in ``erasure/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from ..erasure.refusal import pair_differences, pool, refusal_directions
from ..erasure.twin import TWIN, TwinParams, twin_edit
from ..errors import ProbeError
from ..vud.delta import Delta, DeltaEntry, map_input_entry, projection_entry, versions
from .activations import Activations, GroupActivations
from .params import ProbeParams
from .sources import WeightReader

if TYPE_CHECKING:
    from ..families.recipes import Family


@dataclass(frozen=True)
class GroupResult:
    site: str
    component: str
    input: str  # what the directions were computed on
    dim: int
    samples: int
    kept: float
    targets: list[str]
    notes: dict = field(default_factory=dict)  # method-specific: the twin's vocabulary scan


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


def _extra_preserved(
    acts: Activations, g: GroupActivations, picked: list[str]
) -> list[torch.Tensor]:
    """The captured ``--preserve`` prompts' tokens, less those naming a word the scan picked."""
    from ..erasure.scan import substitute

    if "preserve" not in g.roles:
        return []
    texts = (acts.concept.get("scan") or {}).get("preserve")
    if not isinstance(texts, list) or len(texts) != len(g.roles["preserve"]):
        raise ProbeError(f"site {g.site} ({g.input}): the preserve prompts' record is missing")
    return [
        c.tokens
        for t, p in zip(texts, g.roles["preserve"])
        if substitute(t, picked, "") is None
        for c in p
    ]


def _scanned(
    acts: Activations,
    g: GroupActivations,
    params: ProbeParams,
    ref: GroupActivations | None = None,
) -> tuple[
    list[tuple[torch.Tensor, list[int]]],
    list[int],
    dict | None,
    tuple[list[torch.Tensor], list[torch.Tensor]],
]:
    """The scanned words that pass the rule at this group, as extra unsafe prompts (readings, ids),
    the pair each one belongs to, the scan's record for the delta's metadata (None: no scan), and
    with ``params.scan_keep`` the unpicked words' slot readings to preserve (G's and REF's, row for
    row; empty lists otherwise). REF: the readings the words are scored on (default G's own; a
    repairing cascade scores the original readings, so it picks what the site alone would)."""
    from ..erasure.scan import kept_slots, scan_scores
    from .capture import SCAN_ROLES

    if not params.scan:
        return [], [], None, ([], [])
    plan = acts.concept.get("scan")
    if not isinstance(plan, dict) or any(r not in g.roles for r in SCAN_ROLES):
        raise ProbeError(
            f"site {g.site} ({g.input}): --scan needs the vocabulary scan's captures; capture with "
            "probe --method twin --scan N (--save-activations keeps them)"
        )
    if params.scan > int(plan.get("size", 0)):
        raise ProbeError(
            f"--scan {params.scan}: these activations hold a scan of {plan.get('size')} words; "
            "build with --scan at most that (the nearest words first), or capture again"
        )
    ref = g if ref is None else ref

    def words(x: GroupActivations) -> dict[str, list[tuple[int, torch.Tensor, list[int]]]]:
        rows = _with_ids(x, "scan")
        by_word: dict[str, list[tuple[int, torch.Tensor, list[int]]]] = {}
        at = 0
        for w, pairs in zip(plan["words"], plan["pairs"]):
            for p in pairs:
                by_word.setdefault(w, []).append((int(p), *rows[at]))
                at += 1
        if at != len(rows):
            raise ProbeError(
                f"site {g.site} ({g.input}): the scan's plan does not match its captures"
            )
        # candidates are stored nearest first: a smaller --scan at build uses the first N of them
        return {w: by_word[w] for w in plan["words"][: params.scan] if w in by_word}

    by_word = words(g)
    scored = by_word if ref is g else words(ref)
    try:
        res = scan_scores(_with_ids(ref, "unsafe"), _with_ids(ref, "safe"), scored, params.scan_min)
    except ValueError as e:
        raise ProbeError(f"site {g.site} ({g.input}): vocabulary scan failed: {e}") from None
    extra = [(x, ids) for w in res.picked for _p, x, ids in by_word[w]]
    pair_of = [p for w in res.picked for p, _x, _ids in by_word[w]]
    rec = res.record()
    kept: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    if params.scan_keep:
        below = None if params.scan_keep_max == math.inf else params.scan_keep_max
        whole = params.scan_keep_whole
        rows, held = kept_slots(_with_ids(g, "safe"), by_word, res.picked, res.scores, below, whole)
        rows_as = (  # a repair: the same rows as the original model read them
            rows
            if ref is g
            else kept_slots(_with_ids(ref, "safe"), scored, res.picked, res.scores, below, whole)[0]
        )
        kept = (rows, rows_as)
        rec["kept"] = len(held)
    return extra, pair_of, rec, kept


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
    attack: the inputs it found and the twin's reading as their target). ``params.scan``: the
    scanned words that read like the concept word join the pairs (the same twin).
    ``params.cascade``: a site whose chain starts at another edited site's weight is fitted on what
    it reads through that edit; with ``params.cascade_repair`` its targets are the original
    readings (the twin's, and the preserved prompts' own before any edit), so it also undoes what
    the first edit moved, instead of keeping it."""
    from .capture import TWIN_ROLES

    entries: list[DeltaEntry] = []
    results: list[GroupResult] = []
    groups = list(acts.groups)
    fam = _cascade_family(acts) if params.cascade else None
    feeds = _cascade_links(acts, fam, groups) if fam is not None else {}
    fed = {h for hs in feeds.values() for h in hs}
    order = sorted(range(len(groups)), key=lambda i: i in fed)  # a fed site after its feeder
    original = list(groups)  # what each site read before any edit (a cascade's repair targets)
    for gi in order:
        g = groups[gi]
        ref = original[gi] if params.cascade_repair and gi in fed else g
        missing = [r for r in TWIN_ROLES if r not in g.roles]
        if missing:
            raise ProbeError(
                f"site {g.site} ({g.input}): twin needs the token captures {', '.join(missing)}; "
                "capture with probe --method twin (--save-activations keeps them)"
            )

        def preserved(x: GroupActivations, picked: list[str], slots) -> list[torch.Tensor]:
            own = [c.tokens for r in ("neutral", "safe", "empty") for p in x.roles[r] for c in p]
            return own + _extra_preserved(acts, x, picked) + slots

        def empty(x: GroupActivations) -> torch.Tensor:
            return torch.cat([c.tokens for p in x.roles["empty"] for c in p])

        # a learned null caption (recipe key null_caption) is what a removed word and the
        # unconditional branch read there, position by position; else padding's one reading
        pad = g.roles["null"][0][0].tokens if "null" in g.roles else g.roles["pad"][0][0].tokens[0]
        if params.anchor_empty and "null" in g.roles:
            raise ProbeError(
                f"--anchor-empty: at site {g.site} the unconditional branch reads the family's "
                "learned null caption, which the twin already keeps exactly, not the empty prompt"
            )
        if ref is not g and "null" in g.roles:
            raise ProbeError(
                f"--cascade-repair: site {g.site} reads a learned null caption, which the twin "
                "keeps exactly; a repair toward the original readings is not built for it"
            )
        tp = TwinParams(beta=params.beta, ridge=params.ridge, null=params.null)
        # the twin's reading as the original model gives it (ref is g unless repairing)
        unsafe, safe = _with_ids(g, "unsafe"), _with_ids(ref, "safe")
        scan_rows, pair_of, scan_rec, (slots, slots_as) = _scanned(acts, g, params, ref)
        picked = scan_rec["picked"] if scan_rec else []
        preserve = preserved(g, picked, slots)
        anchors = empty(g) if params.anchor_empty else None
        originals = None  # what the preserved rows and anchors must map back to, when repairing
        if ref is not g:
            originals = (
                preserved(ref, picked, slots_as),
                empty(ref) if anchors is not None else None,
            )
        unsafe, safe = unsafe + scan_rows, safe + [safe[p] for p in pair_of]
        try:
            op, info = twin_edit(
                unsafe, safe, preserve, pad, tp, (extra or {}).get(g.site), anchors, originals
            )
        except (ValueError, RuntimeError) as e:
            raise ProbeError(f"site {g.site} ({g.input}): twin edit failed: {e}") from None
        for h in feeds.get(gi, []):
            groups[h] = _through(groups[h], g, op, fam, weights, params.strength)
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
                {"scan": scan_rec} if scan_rec is not None else {},
            )
        )
    return entries, results


def _cascade_family(acts: Activations) -> Family:
    """The captured family's recipe, which says how each site's chain reads another's weight."""
    from ..families.recipes import load_family

    try:
        return load_family(acts.family, list(acts.capture.overrides))
    except Exception as e:  # noqa: BLE001 - any recipe failure is the same user-facing problem
        raise ProbeError(f"--cascade: family {acts.family!r} could not be loaded ({e})") from None


def may_cascade(fam: Family, feeder: str, fed: str) -> bool:
    """What the recipe alone says of a cascade pair (the weight match needs the capture's
    targets): FED's chain starts with a linear of the same component, FEEDER has no chain of its
    own, and both read the same encoder."""
    a, b = fam.sites.get(feeder), fam.sites.get(fed)
    if a is None or b is None or a.chain or not b.chain or a.encoder != b.encoder:
        return False
    return b.chain[0].op == "linear" and b.chain[0].component is None


def _cascade_links(
    acts: Activations, fam: Family, groups: list[GroupActivations]
) -> dict[int, list[int]]:
    """{g: [h, ...]}: group h's site chain starts with a linear whose weight is a target of g, and g
    reads the encoder output that chain reads (no chain of its own, same encoder and component)."""
    links: dict[int, list[int]] = {}
    for gi, g in enumerate(groups):
        sg = fam.sites.get(g.site)
        if sg is None or sg.chain:
            continue
        for hi, h in enumerate(groups):
            sh = fam.sites.get(h.site)
            if hi == gi or sh is None or not sh.chain or sh.encoder != sg.encoder:
                continue
            first = sh.chain[0]
            if first.op != "linear" or first.component is not None:
                continue
            if h.targets[0].component != g.targets[0].component:
                continue
            if any(t.key.endswith(f"{first.weight}.weight") for t in g.targets):
                links.setdefault(gi, []).append(hi)
    if not links:
        raise ProbeError(
            "--cascade: no chosen site reads another chosen site's edited weight through its chain "
            f"(sites {', '.join(acts.sites)}); give both, e.g. --layers text_proj,cross_kv"
        )
    return links


def cascade_pairs(acts: Activations, fam: Family | None = None) -> list[tuple[str, str]]:
    """(feeder, fed): the captured sites that ``--cascade`` links, a fed site's chain starting at
    the feeder's edited weight (what tune searches as one combined site). FAM: the family recipe
    the capture used (default: loaded again by its name)."""
    fam = fam if fam is not None else _cascade_family(acts)
    groups = list(acts.groups)
    out = []
    for gi, g in enumerate(groups):
        for hi, h in enumerate(groups):
            if gi != hi:
                try:
                    links = _cascade_links(acts, fam, [g, h])
                except ProbeError:
                    continue
                if 0 in links:
                    out.append((g.site, h.site))
    return out


def _through(
    h: GroupActivations,
    g: GroupActivations,
    op,
    fam: Family,
    weights: WeightReader,
    strength: float,
) -> GroupActivations:
    """Group h's captures recomputed through g's edit: its chain run on g's inputs mapped by
    M = I + λ P Qᵀ (the chain's first linear is g's target, and W M x = W (M x))."""
    from .activations import Capture
    from .sites import run_chain

    site = fam.sites[h.site]
    first = f"{site.chain[0].weight}.weight"
    key = next(t.key for t in g.targets if t.key.endswith(first))
    prefix = key[: len(key) - len(first)]
    ws = weights.source.weights(h.targets[0].component)
    M = torch.eye(op.P.shape[0]) + float(strength) * (op.P.float() @ op.Q.float().T)
    roles = dict(h.roles)
    for r, prompts in h.roles.items():
        if r.endswith("_ids") or r == "pad":
            continue
        if r not in g.roles or len(g.roles[r]) != len(prompts):
            raise ProbeError(f"--cascade: site {g.site} has no matching captures of role {r!r}")
        new = []
        for ph, pg in zip(prompts, g.roles[r]):
            calls = []
            for ch, cg in zip(ph, pg):
                if ch.tokens.shape[0] != cg.tokens.shape[0]:
                    raise ProbeError(f"--cascade: {g.site} and {h.site} saw different tokens")
                with torch.no_grad():
                    x = run_chain(site, ws, cg.tokens.float() @ M.T, prefix, weights.source.weights)
                calls.append(Capture(x.float().contiguous(), ch.positions))
            new.append(tuple(calls))
        roles[r] = tuple(new)
    return GroupActivations(h.site, h.input, h.targets, roles)


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
    if p.method != TWIN:
        used = [
            f
            for f, on in (
                ("--scan", p.scan),
                ("--cascade", p.cascade),
                ("--cascade-repair", p.cascade_repair),
                ("--anchor-empty", p.anchor_empty),
                ("--scan-keep", p.scan_keep),
            )
            if on
        ]
        if used:
            raise ProbeError(f"{', '.join(used)}: options of --method {TWIN}, not {p.method}")
        if extra:
            raise ProbeError(f"extra edit rows need --method {TWIN}, not {p.method}")
    unknown = sorted(set(extra or {}) - {g.site for g in acts.groups})
    if unknown:
        raise ProbeError(f"extra edit rows for sites that were not captured: {unknown}")
    reader = weights or WeightReader.for_activations(acts)
    if extra:
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
        if p.scan:
            method_rec.update(
                scan=p.scan,
                scan_min=p.scan_min,
                scan_picked={g.input: g.notes["scan"] for g in groups if "scan" in g.notes},
            )
        if p.cascade:
            method_rec.update(cascade=True)
        if p.cascade_repair:
            method_rec.update(cascade_repair=True)
        if p.anchor_empty:
            method_rec.update(anchor_empty=True)
        if p.scan_keep:
            method_rec.update(scan_keep=True)
            if p.scan_keep_max != math.inf:
                method_rec.update(scan_keep_max=p.scan_keep_max)
            if p.scan_keep_whole:
                method_rec.update(scan_keep_whole=True)
    return Built(Delta(entries, acts.concept, method_rec, versions()), groups)


def build_delta(
    acts: Activations, params: ProbeParams | None = None, weights: WeightReader | None = None
) -> Delta:
    """``build(...).delta``: the delta alone."""
    return build(acts, params, weights).delta
