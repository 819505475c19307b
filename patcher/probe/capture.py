"""Capture: run a concept's prompts through the model and record what each edit site reads.

Two modes, chosen per site by the family recipe:
- ``text``: the site reads the (image or text) encoder's output, possibly after a few small modules
  (a caption projection). Only the encoder runs; those few weights are read lazily from safetensors.
  The denoiser is never built, so a 14B transformer costs nothing but its file headers.
- ``denoise``: the site's input depends on the video tokens (joint attention), so the pipeline runs
  on noise latents for the recipe's number of steps, with forward pre-hooks on the site Linears.

Activations are captured at the *input* of the target Linear (never by patching attention
processors). The result is an ``Activations`` value; no direction math happens here.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..erasure.scan import concept_positions, concept_words, substitute, vocabulary_candidates
from ..errors import ProbeError
from ..families.recipes import Concept, EncoderSpec, Family, SiteSpec, load_concept, load_family
from ..merge.engine import NullReporter, Reporter
from ..vud.delta import versions
from .activations import Activations, Capture, CaptureRecord, GroupActivations, TargetWeight
from .denoise import capture_denoise
from .encoders import Encoder, PipelineEncoder, make_encoder
from .params import check_count
from .sites import Hooks, Target, find_module, hooked_group, run_chain, site_targets
from .sources import ModelSource, WeightReader, open_model, resolve_family

OFFLOADS = ("none", "model", "sequential", "balanced")
# the extra roles of ``CaptureOptions.token_roles``: each unsafe/safe prompt's valid token ids (as an
# (n, 1) float column aligned with its tokens), the empty prompt (the unconditional branch) and what a
# padding position reads at the site (the encoder output zero, through the site's chain)
TWIN_ROLES = ("unsafe_ids", "safe_ids", "empty", "pad")
# the vocabulary scan's roles: each candidate's substituted pair prompts and their token ids; which
# word and pair each one is stands in the concept record's "scan" field
SCAN_ROLES = ("scan", "scan_ids")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class CaptureOptions:
    """What to capture and how; the method parameters are apart (``ProbeParams``)."""

    family: str | None = None  # name or TOML path; detected when None
    sites: tuple[str, ...] | None = None  # recipe site names; None = the recipe's defaults
    layers: str | None = None  # regex that further restricts the target keys
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0  # noise seed for denoise-mode sites (same for both prompts of a pair)
    overrides: tuple[str, ...] = ()  # --set dotted.key=value on the family recipe
    encoders: dict[str, str] = field(default_factory=dict)  # encoder name -> local path or hub id
    revision: str | None = None
    offload: str = (
        "none"  # denoise mode on a model that does not fit: none | model | sequential | balanced
    )
    # also capture what token-aligned methods (twin) read: TWIN_ROLES (text-mode sites only)
    token_roles: bool = False
    # twin's vocabulary scan: this many candidate words (nearest to the concept words by input
    # embedding) are substituted for the concept word in every pair and captured (roles SCAN_ROLES)
    scan: int = 0
    # twin: more prompts to preserve (e.g. a list of ordinary captions); those that name the concept
    # word are dropped, the rest are captured as the role ``preserve``
    preserve: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sites is not None:
            object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "preserve", tuple(self.preserve))
        check_count("--scan", self.scan, "candidate words")
        if self.offload not in OFFLOADS:
            raise ProbeError(f"--offload {self.offload!r}: choose one of {', '.join(OFFLOADS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ProbeError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.layers:
            try:
                re.compile(self.layers)
            except re.error as e:
                raise ProbeError(
                    f"--layer-filter {self.layers!r} is not a valid regular expression ({e})"
                ) from None


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: no CUDA device is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ProbeError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ProbeError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


# --------------------------------------------------------------------------- the capture


# what each (site, group) captured before fingerprinting: its targets and, per role, per prompt,
# one Capture per forward call
Raw = dict[tuple[str, str], tuple[list[Target], dict[str, list[list[Capture]]]]]


def capture(
    model: str | Path | ModelSource,
    concept: str | Path | Concept,
    options: CaptureOptions | None = None,
    weights: WeightReader | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
) -> Activations:
    """Run CONCEPT's prompts through MODEL and return what every target of every site reads.

    ``weights`` fingerprints the targets (pass the reader the builds will use, so that each W is
    read once); it is used only after the encoders and pipelines are released, so their memory and
    the weights' never add up.
    """
    opt = options or CaptureOptions()
    con = concept if isinstance(concept, Concept) else load_concept(concept)
    src = open_model(model, opt)
    fam = (
        load_family(opt.family, list(opt.overrides))
        if opt.family
        else resolve_family(src, None, list(opt.overrides))
    )
    sites, targets = _site_targets(src, fam, opt)
    device = resolve_device(opt.device)
    dtype = resolve_dtype(opt.dtype, device)
    scan: dict = {}
    raw = _capture_sites(
        src, fam, sites, targets, con, opt, device, dtype, reporter or NullReporter(), log, scan
    )
    gc.collect()  # the encoders and pipeline are gone; free them before the weights are read
    groups = _fingerprinted(raw, src, fam, weights or WeightReader(src, keep=False))
    record = CaptureRecord(
        src.origin or str(model),
        opt.revision,
        device,
        str(dtype).removeprefix("torch."),
        opt.seed,
        opt.layers,
        opt.overrides,
        fam.denoise.steps if any(s.mode == "denoise" for s in sites) else None,
    )
    names = tuple(s.name for s in sites)
    concept_rec = con.record() | ({"scan": scan} if scan else {})
    return Activations(fam.name, dict(fam.defaults), names, concept_rec, record, versions(), groups)


def _site_targets(
    src: ModelSource, fam: Family, opt: CaptureOptions
) -> tuple[list[SiteSpec], dict[str, list[Target]]]:
    """The chosen sites and the stored weights each one targets; unknown names fail here."""
    site_names = list(opt.sites or fam.default_sites)
    for s in site_names:
        if s not in fam.sites:
            raise ProbeError(
                f"--layers {s!r}: family {fam.name} has sites {', '.join(sorted(fam.sites))}"
            )
    for n in opt.encoders:
        if n not in fam.encoders:
            raise ProbeError(
                f"--encoder {n}=...: family {fam.name} has encoders {', '.join(sorted(fam.encoders))}"
            )
    layers = re.compile(opt.layers) if opt.layers else None
    sites = [fam.sites[s] for s in site_names]
    targets: dict[str, list[Target]] = {}
    for site in sites:
        ts = site_targets(site, src, layers, fam.key_prefixes)
        if not ts:
            raise ProbeError(
                f"site {site.name!r} of family {fam.name} matches no weight in {src.root} (components {site.components}); "
                "is this the right --family, or did --layer-filter exclude everything?"
            )
        targets[site.name] = ts
    return sites, targets


def _fingerprinted(
    raw: Raw, src: ModelSource, fam: Family, weights: WeightReader
) -> tuple[GroupActivations, ...]:
    """Each group with its targets' shapes, stored dtypes and sha256 (one read of each W)."""
    groups = []
    for (site_name, g), (ts, roles) in raw.items():
        recs = []
        for t in ts:
            b = weights.read(t.component, t.key)
            # a single original-layout file has no components: the delta names the recipe's
            comp = fam.sites[site_name].components[0] if src.single is not None else t.component
            shape = (int(b.W.shape[0]), int(b.W.shape[1]))
            recs.append(
                TargetWeight(t.component, t.key, f"{comp}/{t.key}", shape, b.dtype, b.sha256)
            )
        prompts = {r: tuple(tuple(p) for p in ps) for r, ps in roles.items()}
        groups.append(GroupActivations(site_name, g, tuple(recs), prompts))
    return tuple(groups)


def _capture_sites(
    src: ModelSource,
    fam: Family,
    sites: list[SiteSpec],
    targets: dict[str, list[Target]],
    con: Concept,
    opt: CaptureOptions,
    device: str,
    dtype: torch.dtype,
    rep: Reporter,
    log: Callable[[str], None] | None,
    scan_out: dict | None = None,
) -> Raw:
    """Every site's captures; the encoders and pipeline live only inside this call. With
    ``opt.scan``, SCAN_ROLES are captured too and ``scan_out`` receives what they hold."""
    say = log or (lambda _m: None)
    text_sites = [s for s in sites if s.mode == "text"]
    denoise_sites = [s for s in sites if s.mode == "denoise"]
    total = 0
    if (opt.scan or opt.preserve) and not opt.token_roles:
        raise ProbeError("--scan and --preserve are options of the twin edit: use --method twin")
    if opt.token_roles and denoise_sites:
        raise ProbeError(
            "--method twin needs token-aligned inputs: use text-mode sites (e.g. --layers text_proj,cross_kv)"
        )
    for s in text_sites:
        if opt.token_roles and fam.encoders[s.encoder].kind == "pipeline":
            raise ProbeError(
                f"--method twin aligns tokenizer tokens; site {s.name!r} reads the pipeline's own "
                "encoding (use --method cpca)"
            )
        total += sum(len(x) for x in _pairs_inputs(con, fam.encoders[s.encoder]))
        total += 1 if opt.token_roles else 0
        total += opt.scan * len(con.pairs)
    if denoise_sites:  # one pipeline call per prompt, all sites hooked at once
        total += 2 * len(con.pairs) + len(con.neutral)
    out: Raw = {}
    encoders: dict[str, Encoder | PipelineEncoder] = {}
    rep.start("probing", total)
    try:
        for site in text_sites:
            enc_spec = fam.encoders[site.encoder]
            if site.encoder not in encoders:
                say(f"loading encoder {site.encoder} ({enc_spec.component}) on {device}")
                encoders[site.encoder] = make_encoder(
                    enc_spec, src, opt.encoders.get(site.encoder), device, dtype
                )
            un, sa, ne = _pairs_inputs(con, enc_spec)
            items = {"unsafe": un, "safe": sa, "neutral": ne}
            if opt.token_roles:
                if enc_spec.kind == "image":
                    raise ProbeError(
                        f"--method twin aligns text tokens; site {site.name!r} reads images"
                    )

                items["empty"] = [""]  # the unconditional branch's prompt must keep its reading
            enc = encoders[site.encoder]
            # the pairs' token ids (twin alignment), and the concept's words as the pairs spell them
            ids = _token_ids(enc, un + sa) if opt.token_roles else []
            words = _concept_words(enc, ids, len(un)) if (opt.scan or opt.preserve) else []
            scan_prompts: list[str] = []
            if opt.scan:
                plan, scan_prompts = _scan_plan(enc, un, ids, words, opt.scan)
                if scan_out is not None:
                    if "words" in scan_out and scan_out["words"] != plan["words"]:
                        raise ProbeError(
                            "--scan with sites that read different encoders is not supported "
                            "(one scan plan per delta): probe one encoder's sites at a time"
                        )
                    scan_out.update(plan)
                say(f"scanning {len(plan['words'])} candidate words at {site.name}")
                items["scan"] = scan_prompts
            if opt.preserve:
                kept = [p for p in opt.preserve if substitute(p, words, "") is None]
                if not kept:
                    raise ProbeError(
                        "--preserve: every prompt names the concept word; none is left"
                    )
                if scan_out is not None:
                    scan_out["preserve"] = kept
                items["preserve"] = kept
            by_group, acts = capture_text(
                src,
                site,
                enc,
                targets[site.name],
                items,
                rep.advance,
                pad=opt.token_roles,
                recipe=f"recipe {fam.path or fam.name}",
            )
            for g, ts in by_group.items():
                roles = {r: [[Capture.of(x, m)] for x, m in items] for r, items in acts[g].items()}
                if opt.token_roles:
                    col = [torch.tensor(i, dtype=torch.float32)[:, None] for i in ids]
                    roles["unsafe_ids"] = [[Capture.of(x, None)] for x in col[: len(un)]]
                    roles["safe_ids"] = [[Capture.of(x, None)] for x in col[len(un) :]]
                if scan_prompts:
                    roles["scan_ids"] = [
                        [Capture.of(torch.tensor(i, dtype=torch.float32)[:, None], None)]
                        for i in _token_ids(enc, scan_prompts)
                    ]
                out[(site.name, g)] = (ts, roles)
        if denoise_sites:
            out.update(
                capture_denoise(src, fam, denoise_sites, targets, con, opt, device, dtype, rep, say)
            )
    finally:
        rep.stop()
    return out


def _pairs_inputs(concept: Concept, enc: EncoderSpec) -> tuple[list, list, list]:
    if enc.kind == "image":
        if concept.pairs[0].unsafe_image is None:
            raise ProbeError(
                f"encoder {enc.name!r} reads images, but concept {concept.name!r} has no unsafe_image/safe_image in its pairs"
            )
        if len(concept.neutral_images) < 2:
            raise ProbeError(
                f"concept {concept.name!r}: an image site needs neutral_images (2 or more) for the contrast"
            )
        return (
            [p.unsafe_image for p in concept.pairs],
            [p.safe_image for p in concept.pairs],
            list(concept.neutral_images),
        )
    return [p.unsafe for p in concept.pairs], [p.safe for p in concept.pairs], list(concept.neutral)


def _concept_words(enc: Encoder, ids: list[list[int]], n_unsafe: int) -> list[str]:
    """The concept's words as the pairs spell them, from the pairs' token ids (unsafe, then safe)."""
    return concept_words(enc.pre, ids[:n_unsafe], ids[n_unsafe:])


def _scan_plan(
    enc: Encoder, unsafe: list[str], ids: list[list[int]], words: list[str], n: int
) -> tuple[dict, list[str]]:
    """The vocabulary scan's prompts: each candidate word in the concept word's place in every
    unsafe prompt of the pairs, and the plan that says which word and pair each prompt is. IDS:
    the pairs' token ids (unsafe, then safe); WORDS: the concept's words."""
    uids, sids = ids[: len(unsafe)], ids[len(unsafe) :]
    own = [iu[i] for iu, is_ in zip(uids, sids) for i in concept_positions(iu, is_)]
    emb = None
    get = getattr(enc.model, "get_input_embeddings", None)
    if callable(get) and get() is not None:
        emb = get().weight.detach().float().cpu()
    cands = vocabulary_candidates(enc.pre, emb, sorted(set(own)), {w.lower() for w in words}, n)
    prompts: list[str] = []
    plan: dict = {"size": n, "concept_words": words, "words": cands, "pairs": []}
    for c in cands:
        used = []
        for p, u in enumerate(unsafe):
            s = substitute(u, words, c)
            if s is not None:
                prompts.append(s)
                used.append(p)
        plan["pairs"].append(used)
    return plan, prompts


def _token_ids(enc: Encoder, prompts: list[str]) -> list[list[int]]:
    """The valid token ids of each prompt, tokenized exactly as ``Encoder`` does (twin alignment)."""
    spec = enc.spec
    tok = enc.pre(
        [enc.template.format(t) for t in prompts],
        padding="max_length",
        max_length=spec.max_length + enc.crop_start,
        truncation=True,
        return_tensors="pt",
    )
    ids = tok.input_ids[:, enc.crop_start :]
    mask = tok.attention_mask[:, enc.crop_start :].bool()
    return [ids[i][mask[i]].tolist() for i in range(len(prompts))]


def capture_text(
    src: ModelSource,
    site: SiteSpec,
    enc: Encoder | PipelineEncoder,
    targets: list[Target],
    items: dict[str, list],
    advance: Callable[[int], None] = lambda _n: None,
    pad: bool = False,
    recipe: str = "the family recipe",
) -> tuple[dict[str, list[Target]], dict[str, dict[str, list]]]:
    """Text-mode capture: the input of each target group for every item of every role.

    Targets inside the encoder are captured by pre-hooks on their Linear modules during the encoder
    forward; targets in another component read the encoder output through the site's chain.
    Returns (targets by group, {group: {role: [(acts (tokens, H), mask or None)]}}). With ``pad``,
    each group also gets the role ``pad``: what a padding position reads there (Wan and the organism
    zero the encoder output after the real tokens, so the site's chain applied to a zero vector)
    and, when the site declares a ``null_caption``, the role ``null``: that stored tensor's rows
    through the chain, what the unconditional branch reads there position by position.
    """
    spec = enc.spec
    # the loaded modules a target may sit in (an encoder; a pipeline encoder's connectors): hooked
    modules = getattr(enc, "modules", None) or {spec.component: enc.model}
    by_group: dict[str, list[Target]] = {}
    for t in targets:
        g = hooked_group(t) if t.component in modules else f"{t.component}:{site.name}"
        by_group.setdefault(g, []).append(t)
    hooked = {
        g: find_module(modules[ts[0].component], ts[0].module)
        for g, ts in by_group.items()
        if ts[0].component in modules
    }
    hooks = Hooks(hooked, lambda _n, x: x) if hooked else None
    raw: dict[str, tuple[list, dict[str, list]]] = {}
    try:
        for role, its in items.items():
            acts: list = []
            hook_acts: dict[str, list] = {g: [] for g in hooked}
            for i in range(0, len(its), 8):
                chunk = its[i : i + 8]
                acts += enc(chunk)
                if hooks is not None:
                    for g, xs in hooks.take().items():
                        for x in xs:
                            hook_acts[g] += [x[j] for j in range(x.shape[0])]
                advance(len(chunk))
            raw[role] = (acts, hook_acts)
    finally:
        if hooks is not None:
            hooks.remove()

    out: dict[str, dict[str, list]] = {}
    for g, ts in by_group.items():
        ws = src.weights(ts[0].component)
        out[g] = {}
        for role, (acts, hook_acts) in raw.items():
            if g in hook_acts:
                res = []
                for (_x0, m), x in zip(acts, hook_acts[g]):
                    if x.dim() == 2 and spec.kind != "image":
                        x = x[enc.crop_start :]
                    res.append((x, m if m is not None and m.shape[0] == x.shape[0] else None))
            else:
                prefix = ts[0].key[: len(ts[0].key) - len(ts[0].module + ".weight")]
                res = [
                    (run_chain(site, ws, x, prefix, src.weights) if site.chain else x, m)
                    for x, m in acts
                ]
            out[g][role] = res
        if pad:
            x0 = next(iter(raw.values()))[0][0][0]
            if g in hooked or not site.chain:
                z = torch.zeros(1, int(ts[0].in_dim))
            else:
                prefix = ts[0].key[: len(ts[0].key) - len(ts[0].module + ".weight")]
                z = run_chain(site, ws, torch.zeros(1, x0.shape[-1]), prefix, src.weights)
            out[g]["pad"] = [(z, None)]
            if site.null_caption is not None:
                if g in hooked:
                    raise ProbeError(
                        f"{recipe}, site {site.name!r}: null_caption replaces the encoder output, "
                        "so it needs targets outside the encoder"
                    )
                out[g]["null"] = [
                    (_null_caption(src, site, ts[0], x0.shape[-1], spec, recipe), None)
                ]
        dim = next(iter(out[g].values()))[0][0].shape[-1]
        for t in ts:
            if t.in_dim != dim:
                raise ProbeError(
                    f"{t.component}/{t.key}: in-dim {t.in_dim} does not equal the site input's width {dim}; "
                    f"site {site.name!r} does not read {site.encoder!r} here (wrong family or recipe)"
                )
    return by_group, out


def _null_caption(
    src: ModelSource, site: SiteSpec, t: Target, width: int, enc: EncoderSpec, recipe: str
) -> torch.Tensor:
    """The site's reading of its learned null caption: the stored (positions, width) tensor, pushed
    through the chain exactly as encoder output is. Strict: the tensor must exist next to the site's
    weights, be 2-D, as wide as the encoder output, and cover every position the encoder gives."""
    prefix = t.key[: len(t.key) - len(t.module + ".weight")]
    key = f"{prefix}{site.null_caption}"
    where = f"{recipe}, site {site.name!r}: null_caption {site.null_caption!r}"
    ws = src.weights(t.component)
    if ws is None or key not in ws.key_file:
        raise ProbeError(f"{where} is not in {ws.label if ws is not None else t.component}")
    x = WeightReader(src, keep=False).read(t.component, key).W
    if x.dim() != 2 or x.shape[1] != width:
        raise ProbeError(
            f"{where} has shape {tuple(x.shape)}; it must be (positions, {width}), "
            f"{width} being the width of encoder {enc.name!r}'s output"
        )
    if x.shape[0] < enc.max_length:
        raise ProbeError(
            f"{where} has {x.shape[0]} rows; encoder {enc.name!r} gives up to {enc.max_length} "
            "positions, and each needs its null row"
        )
    return run_chain(site, ws, x, prefix, src.weights) if site.chain else x


def site_inputs(
    model: str | Path,
    site: str,
    prompts: list,
    *,
    family: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overrides: list[str] | None = None,
    encoders: dict[str, str] | None = None,
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """What a text-mode site's weights read for these prompts (or image paths), per group: for checks and notebooks."""
    from .sources import open_source

    src = open_source(model)
    fam = load_family(family, overrides) if family else resolve_family(src, None, overrides or [])
    if site not in fam.sites or fam.sites[site].mode != "text":
        raise ProbeError(f"site {site!r} is not a text-mode site of family {fam.name}")
    sp = fam.sites[site]
    dev = resolve_device(device)
    enc = make_encoder(
        fam.encoders[sp.encoder],
        src,
        (encoders or {}).get(sp.encoder),
        dev,
        resolve_dtype(dtype, dev),
    )
    _groups, acts = capture_text(
        src, sp, enc, site_targets(sp, src, None, fam.key_prefixes), {"items": prompts}
    )
    return {g: a["items"] for g, a in acts.items()}
