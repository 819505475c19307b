"""``vpatch probe``: find the concept's refusal direction(s) at each edit site and write a ``.vud``.

Two probe modes, chosen per site by the family recipe:
- ``text``: the site reads the (image or text) encoder's output, possibly after a few small modules
  (a caption projection). Only the encoder runs; those few weights are read lazily from safetensors.
  The denoiser is never built, so a 14B transformer costs nothing but its file headers.
- ``denoise``: the site's input depends on the video tokens (joint attention), so the pipeline runs
  on noise latents for the recipe's number of steps, with forward pre-hooks on the site Linears.

Activations are captured at the *input* of the target Linear (never by patching attention
processors). The math lives in ``refusal.py``; this module only collects activations and writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import hub
from ..checkpoint import WeightSet, _scan_folder, load_single
from ..erasure.refusal import METHODS, POOLINGS, pair_differences, pool, refusal_directions
from ..errors import ProbeError
from ..families.recipes import (
    Concept,
    EncoderSpec,
    Family,
    SiteSpec,
    detect_family,
    load_concept,
    load_family,
)
from ..layouts import AliasRules
from ..merge.engine import NullReporter, Reporter
from ..safetensors_io import TensorReader, bytes_to_tensor
from ..vud.delta import Delta, DeltaEntry, projection_entry, versions, write_delta

_LAYER_IDX = re.compile(r"\.(\d+)\.")
OFFLOADS = ("none", "model", "sequential", "balanced")


@dataclass
class ProbeOptions:
    family: str | None = None  # name or TOML path; detected when None
    method: str | None = None
    rank: int | None = None
    alpha: float | None = None
    strength: float | None = None
    directions: int | None = None
    pooling: str | None = None
    sites: list[str] | None = None  # recipe site names; None = the recipe's defaults
    layers: str | None = None  # regex that further restricts the target keys
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    overrides: list[str] = field(
        default_factory=list
    )  # --set dotted.key=value on the family recipe
    encoders: dict[str, str] = field(default_factory=dict)  # encoder name -> local path or hub id
    revision: str | None = None
    offload: str = (
        "none"  # denoise mode on a model that does not fit: none | model | sequential | balanced
    )
    overwrite: bool = False  # replace an existing OUT


@dataclass
class GroupResult:
    site: str
    component: str
    input: str  # what the directions were computed on
    dim: int
    samples: int
    kept: float
    targets: list[str]


@dataclass
class ProbeReport:
    delta: str
    delta_sha256: str
    family: str
    concept: str
    method: dict
    groups: list[GroupResult]
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- model source


@dataclass
class ModelSource:
    """Where the weights are: a diffusers folder (components) or one original-layout file."""

    root: Path
    pipeline_class: str | None
    model_index: dict
    single: WeightSet | None = None  # original single-file layout

    def weights(self, component: str) -> WeightSet | None:
        if self.single is not None:
            return self.single
        folder = self.root / component
        if not folder.is_dir():
            return None
        sets, _pickles = _scan_folder(folder)
        plain = [ws for ws in sets if ws.variant is None]
        return (plain or sets or [None])[0]

    def keys(self) -> set[str]:
        if self.single is not None:
            return set(self.single.key_file)
        return set()


def _hub_patterns(fam: Family, sites: list[SiteSpec]) -> list[str]:
    pats = ["model_index.json"]
    if any(s.mode == "denoise" for s in sites):
        return pats + [f"*/{p}" for p in (*hub.SIDECARS, "*.safetensors")]
    for s in sites:
        for c in s.components:
            pats += [f"{c}/*.json", f"{c}/*.safetensors"]
        enc = fam.encoders.get(s.encoder or "")
        if enc is not None:  # never "folder/*": a folder may also hold pickles
            pats += [
                f"{d}/{p}"
                for d in (enc.component, enc.preprocessor)
                for p in (*hub.SIDECARS, "*.safetensors")
            ]
    return sorted(set(pats))


def open_source(
    model: str | Path, revision: str | None = None, patterns: list[str] | None = None
) -> ModelSource:
    p = Path(model)
    if not p.exists():
        p = hub.fetch(
            str(model), revision, patterns
        )  # safetensors and sidecars only, never pickles
    if p.is_file():
        return ModelSource(p.parent, None, {}, single=load_single(p))
    idx = p / "model_index.json"
    if idx.is_file():
        try:
            mi = json.loads(idx.read_text())
        except ValueError:
            raise ProbeError(f"{idx}: not valid JSON") from None
        return ModelSource(p, mi.get("_class_name"), mi)
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return ModelSource(p, None, {}, single=load_single(files[0]))
    raise ProbeError(
        f"{p}: not a diffusers folder (no model_index.json) and not a single .safetensors checkpoint"
    )


# --------------------------------------------------------------------------- encoders


def _quiet_libraries() -> None:
    """vpatch shows its own progress; the libraries' per-file bars and advice would interleave with it."""
    import warnings

    warnings.filterwarnings(
        "ignore", message=".*torch_dtype.*deprecated.*"
    )  # kept: older releases in our range need it
    for lib in ("transformers", "diffusers"):
        try:
            mod = __import__(lib)
            mod.utils.logging.set_verbosity_error()
            mod.utils.logging.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def _import(lib: str, cls: str):
    _quiet_libraries()
    try:
        mod = __import__(lib)
        return getattr(mod, cls)
    except ImportError:
        raise ProbeError(f"probing needs {lib}: pip install 'vpatch[probe]'") from None
    except AttributeError:
        raise ProbeError(
            f"{lib} has no class {cls}; upgrade {lib} or set the class in the family recipe"
        ) from None


def _component_class(
    src: ModelSource, name: str, fallback: str | None, what: str
) -> tuple[str, str]:
    entry = src.model_index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
        return entry[0], entry[1]
    if fallback:
        return "transformers", fallback
    raise ProbeError(
        f"{src.root}: model_index.json has no {name!r} ({what}); pass --encoder NAME=PATH or fix the recipe"
    )


class Encoder:
    """An encoder plus its tokenizer/processor; gives (tokens, H) activations and a validity mask."""

    def __init__(
        self,
        spec: EncoderSpec,
        src: ModelSource,
        override: str | None,
        device: str,
        dtype: torch.dtype,
    ):
        self.spec = spec
        self.device = device
        if override is not None or src.single is not None:
            loc = override or spec.hub_id
            if loc is None:
                raise ProbeError(
                    f"encoder {spec.name!r}: the checkpoint does not bundle it; pass --encoder {spec.name}=PATH_OR_HUB_ID"
                )
            mcls = _import("transformers", spec.model_class or "AutoModel")
            pcls = _import(
                "transformers",
                spec.preprocessor_class
                or ("AutoImageProcessor" if spec.kind == "image" else "AutoTokenizer"),
            )
            root = Path(loc)
            sub = root / spec.preprocessor if (root / spec.preprocessor).is_dir() else root
            try:
                self.model = mcls.from_pretrained(loc, torch_dtype=dtype)
                self.pre = pcls.from_pretrained(str(sub))
            except OSError as e:
                raise ProbeError(
                    f"encoder {spec.name!r} from {loc}: {str(e).splitlines()[0]} "
                    f"Download it, then pass --encoder {spec.name}=LOCAL_FOLDER"
                ) from None
            self.component_dir = root
        else:
            lib, cls = _component_class(src, spec.component, spec.model_class, "encoder")
            plib, pcls_name = _component_class(
                src, spec.preprocessor, spec.preprocessor_class, "tokenizer/processor"
            )
            if lib != "transformers":
                raise ProbeError(
                    f"encoder {spec.name!r}: {lib}.{cls} is not a transformers model; vpatch hooks transformers encoders"
                )
            self.model = _import(lib, cls).from_pretrained(
                src.root / spec.component, torch_dtype=dtype
            )
            self.pre = _import(plib, pcls_name).from_pretrained(src.root / spec.preprocessor)
            self.component_dir = src.root / spec.component
        self.model.to(device).eval()
        self.template, self.crop_start = spec.template, spec.crop_start
        if spec.template_from:
            mod, attr = spec.template_from.split(":", 1)
            try:
                tpl = getattr(__import__(mod, fromlist=[attr]), attr)
                self.template, self.crop_start = str(tpl["template"]), int(tpl["crop_start"])
            except (ImportError, AttributeError, KeyError, TypeError, ValueError):
                raise ProbeError(
                    f"encoder {spec.name!r}: template_from {spec.template_from!r} is not importable as a "
                    "{'template', 'crop_start'} dict; upgrade diffusers or set template/crop_start in the recipe"
                ) from None
            if self.template.count("{}") != 1:
                raise ProbeError(
                    f"encoder {spec.name!r}: the template from {spec.template_from} has no single {{}} slot"
                )

    def __call__(self, items: list) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One (tokens, H) activation and mask per prompt (or image)."""
        spec = self.spec
        if spec.kind == "image":
            from PIL import Image

            imgs = [Image.open(p).convert("RGB") for p in items]
            inputs = self.pre(images=imgs, return_tensors="pt").to(self.device)
            mask = None
        else:
            texts = [self.template.format(t) for t in items]
            tok = self.pre(
                texts,
                padding="max_length",
                max_length=spec.max_length + self.crop_start,
                truncation=True,
                return_tensors="pt",
            )
            inputs = {"input_ids": tok.input_ids.to(self.device)}
            mask = tok.attention_mask
            if spec.pass_mask:
                inputs["attention_mask"] = mask.to(self.device)
        want_hidden = spec.output.startswith("hidden_states")
        with torch.inference_mode():
            out = (
                self.model(**inputs, output_hidden_states=want_hidden)
                if want_hidden
                else self.model(**inputs)
            )
        if want_hidden:
            x = out.hidden_states[int(spec.output.split(":")[1])]
        else:
            x = getattr(out, spec.output, None)
            if x is None:
                raise ProbeError(
                    f"encoder {spec.name!r}: output {spec.output!r} not produced by {type(self.model).__name__}"
                )
        x = x.float().cpu()
        if x.dim() == 2:  # pooled: one "token" per prompt
            return [(x[i : i + 1], None) for i in range(x.shape[0])]
        res = []
        for i in range(x.shape[0]):
            xi = x[i, self.crop_start :]
            if spec.kind == "image" or spec.mask == "all":
                res.append((xi, None))
            else:
                res.append((xi, mask[i, self.crop_start :].bool()))
        return res


# --------------------------------------------------------------------------- sites


@dataclass
class Target:
    component: str
    key: str  # stored key in that component's weights
    module: str  # module path (key without ``.weight``), as named inside the loaded model
    in_dim: int


def site_targets(
    site: SiteSpec, src: ModelSource, layers: re.Pattern | None, prefixes: list[str] | None = None
) -> list[Target]:
    """Every stored weight the site's patterns match, in every present component.

    Stored keys are matched with any of the family's alias prefixes removed (e.g. the ``text_model.``
    wrapper that transformers 4.x CLIP files carry and 5.x files lack, or a single file's
    ``model.diffusion_model.``), so one recipe serves every layout; the delta keeps the stored key.
    """
    out = []
    rules = AliasRules(list(prefixes or []))
    for comp in site.components:
        ws = src.weights(comp)
        if ws is None:
            continue
        for key in sorted(ws.key_file):
            canon = rules.strip(key)[0]
            if not site.matches(canon) or (layers is not None and not layers.search(canon)):
                continue
            shape = ws.shape(key)
            if shape is None or len(shape) != 2:
                continue
            out.append(Target(comp, key, canon.removesuffix(".weight"), int(shape[1])))
    if site.last is not None:
        idx = sorted({int(m.group(1)) for t in out if (m := _LAYER_IDX.search(t.module))})
        keep = set(idx[-site.last :])
        out = [t for t in out if (m := _LAYER_IDX.search(t.module)) and int(m.group(1)) in keep]
    return out


def _hooked_group(t: Target) -> str:
    """Hooked Linears of one parent module (to_k/to_v of one attention) read one input: one direction."""
    return f"{t.component}:{t.module.rsplit('.', 1)[0]}:{t.in_dim}"


def _read_fingerprinted(ws: WeightSet, key: str) -> tuple[torch.Tensor, str]:
    """A target weight in fp32 and the sha256 of its stored bytes, from one read (the same digest
    apply computes row block by row block)."""
    h = ws.headers[ws.key_file[key]]
    t = h.tensors[key]
    with TensorReader(h) as rd:
        raw = rd.raw(key)
    return bytes_to_tensor(raw, t.dtype, t.shape).to(torch.float32), hashlib.sha256(raw).hexdigest()


def _read(ws: WeightSet, key: str) -> torch.Tensor:
    f = ws.key_file.get(key)
    if f is None:
        raise ProbeError(
            f"weight {key} is missing from {ws.label}; the recipe's chain does not fit this checkpoint"
        )
    with TensorReader(ws.headers[f]) as rd:
        return rd.tensor(key).to(torch.float32)


def run_chain(site: SiteSpec, ws: WeightSet, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The few modules between the encoder output and the site (e.g. a caption projection), in fp32.
    ``prefix``: the wrapper prefix the site's own keys carry in this file (``model.diffusion_model.``)."""
    F = torch.nn.functional
    for op in site.chain:
        if op.op == "linear":
            W = _read(ws, f"{prefix}{op.weight}.weight")
            b_key = f"{prefix}{op.weight}.bias"
            x = F.linear(x, W, _read(ws, b_key) if b_key in ws.key_file else None)
        elif op.op == "layer_norm":
            w_key, b_key = f"{prefix}{op.weight}.weight", f"{prefix}{op.weight}.bias"
            w = _read(ws, w_key) if w_key in ws.key_file else None
            b = _read(ws, b_key) if b_key in ws.key_file else None
            x = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps=1e-5 if w is not None else 1e-6)
        elif op.op == "gelu":
            x = F.gelu(x)
        elif op.op == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif op.op == "silu":
            x = F.silu(x)
    return x


# --------------------------------------------------------------------------- capture


@dataclass
class Captured:
    """Per group: activations of each pair's two prompts, and of the neutral prompts (lists of calls)."""

    unsafe: list[list[tuple[torch.Tensor, torch.Tensor | None]]]
    safe: list[list[tuple[torch.Tensor, torch.Tensor | None]]]
    neutral: list[tuple[torch.Tensor, torch.Tensor | None]]


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


class _Hooks:
    """Forward pre-hooks on Linear modules that record their input (never patch attention processors)."""

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        select: Callable[[str, torch.Tensor], torch.Tensor],
    ):
        self.store: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
        self.handles = [
            m.register_forward_pre_hook(self._make(k, select)) for k, m in modules.items()
        ]

    def _make(self, name: str, select):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else kwargs["input"]
            self.store[name].append(select(name, x.detach()).float().cpu())

        return hook

    def take(self) -> dict[str, list[torch.Tensor]]:
        out = self.store
        self.store = {k: [] for k in out}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _find_module(
    root: torch.nn.Module, module_path: str, prefixes: tuple[str, ...] = ("", "text_model.")
) -> torch.nn.Module:
    """The module at this path; loaded models may or may not keep the wrapper the file had."""
    for cand in (f"{p}{module_path}" for p in prefixes):
        try:
            return root.get_submodule(cand)
        except AttributeError:
            continue
    raise ProbeError(
        f"module {module_path} not found in {type(root).__name__}; the recipe does not fit this model version"
    )


def capture_text(
    src: ModelSource,
    site: SiteSpec,
    enc: Encoder,
    targets: list[Target],
    items: dict[str, list],
    advance: Callable[[int], None] = lambda _n: None,
) -> tuple[dict[str, list[Target]], dict[str, dict[str, list]]]:
    """Text-mode capture: the input of each target group for every item of every role.

    Targets inside the encoder are captured by pre-hooks on their Linear modules during the encoder
    forward; targets in another component read the encoder output through the site's chain.
    Returns (targets by group, {group: {role: [(acts (tokens, H), mask or None)]}}).
    """
    spec = enc.spec
    by_group: dict[str, list[Target]] = {}
    for t in targets:
        inside = t.component == spec.component
        g = _hooked_group(t) if inside else f"{t.component}:{site.name}"
        by_group.setdefault(g, []).append(t)
    hooked = {
        g: _find_module(enc.model, ts[0].module)
        for g, ts in by_group.items()
        if ts[0].component == spec.component
    }
    hooks = _Hooks(hooked, lambda _n, x: x) if hooked else None
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
                res = [(run_chain(site, ws, x, prefix) if site.chain else x, m) for x, m in acts]
            out[g][role] = res
        dim = next(iter(out[g].values()))[0][0].shape[-1]
        for t in ts:
            if t.in_dim != dim:
                raise ProbeError(
                    f"{t.component}/{t.key}: in-dim {t.in_dim} does not equal the site input's width {dim}; "
                    f"site {site.name!r} does not read {site.encoder!r} here (wrong family or recipe)"
                )
    return by_group, out


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
    src = open_source(model)
    fam = load_family(family, overrides) if family else resolve_family(src, None, overrides or [])
    if site not in fam.sites or fam.sites[site].mode != "text":
        raise ProbeError(f"site {site!r} is not a text-mode site of family {fam.name}")
    sp = fam.sites[site]
    dev = _device(device)
    enc = Encoder(
        fam.encoders[sp.encoder], src, (encoders or {}).get(sp.encoder), dev, _dtype(dtype, dev)
    )
    _groups, acts = capture_text(
        src, sp, enc, site_targets(sp, src, None, fam.key_prefixes), {"items": prompts}
    )
    return {g: a["items"] for g, a in acts.items()}


# --------------------------------------------------------------------------- the probe


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: no CUDA device is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ProbeError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return name


def _dtype(name: str, device: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in table:
        raise ProbeError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return table[name]


def resolve_family(src: ModelSource, name: str | None, overrides: list[str]) -> Family:
    if name is None:
        name = detect_family(src.pipeline_class, src.keys())
        if name is None:
            what = src.pipeline_class or "this checkpoint's keys"
            raise ProbeError(
                f"cannot tell the model family from {what}; pass --family (see `vpatch families`)"
            )
    return load_family(name, overrides)


def probe(
    model: str | Path,
    concept: str | Path | Concept,
    out: str | Path,
    options: ProbeOptions | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
) -> ProbeReport:
    """Probe MODEL for CONCEPT and write the delta to OUT (atomically)."""
    from ..output import check_target

    opt = options or ProbeOptions()
    rep = reporter or NullReporter()
    say = log or (lambda _m: None)
    check_target(Path(out), [], opt.overwrite)  # fail before any model is loaded
    con = concept if isinstance(concept, Concept) else load_concept(concept)
    fam_hint = load_family(opt.family, opt.overrides) if opt.family else None
    patterns = None
    if fam_hint is not None:
        names = opt.sites or fam_hint.default_sites
        patterns = _hub_patterns(
            fam_hint, [fam_hint.sites[n] for n in names if n in fam_hint.sites]
        )
    src = open_source(model, opt.revision, patterns)
    fam = fam_hint or resolve_family(src, None, opt.overrides)

    method = opt.method or fam.defaults["method"]
    pooling = opt.pooling or fam.defaults["pooling"]
    if opt.offload not in OFFLOADS:
        raise ProbeError(f"--offload {opt.offload!r}: choose one of {', '.join(OFFLOADS)}")
    if method not in METHODS:
        raise ProbeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if pooling not in POOLINGS:
        raise ProbeError(f"--pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    rank = opt.rank or fam.defaults["rank"]
    alpha = fam.defaults["alpha"] if opt.alpha is None else opt.alpha
    strength = fam.defaults["strength"] if opt.strength is None else opt.strength
    ndir = opt.directions or fam.defaults["directions"]
    if rank < 1 or ndir < 1 or alpha < 0:
        raise ProbeError("--rank and --directions must be >= 1 and --alpha >= 0")
    site_names = opt.sites or fam.default_sites
    for s in site_names:
        if s not in fam.sites:
            raise ProbeError(
                f"--layers {s!r}: family {fam.name} has sites {', '.join(sorted(fam.sites))}"
            )
    sites = [fam.sites[s] for s in site_names]
    for n in opt.encoders:
        if n not in fam.encoders:
            raise ProbeError(
                f"--encoder {n}=...: family {fam.name} has encoders {', '.join(sorted(fam.encoders))}"
            )
    try:
        layers = re.compile(opt.layers) if opt.layers else None
    except re.error as e:
        raise ProbeError(
            f"--layer-filter {opt.layers!r} is not a valid regular expression ({e})"
        ) from None
    device = _device(opt.device)
    dtype = _dtype(opt.dtype, device)

    targets: dict[str, list[Target]] = {}
    for site in sites:
        ts = site_targets(site, src, layers, fam.key_prefixes)
        if not ts:
            raise ProbeError(
                f"site {site.name!r} of family {fam.name} matches no weight in {src.root} (components {site.components}); "
                "is this the right --family, or did --layer-filter exclude everything?"
            )
        targets[site.name] = ts

    groups: dict[tuple[str, str], list[Target]] = {}
    encoders: dict[str, Encoder] = {}
    caps: dict[tuple[str, str], Captured] = {}

    text_sites = [s for s in sites if s.mode == "text"]
    denoise_sites = [s for s in sites if s.mode == "denoise"]
    total = 0
    for s in text_sites:
        e = fam.encoders[s.encoder]
        u, sf, nu = _pairs_inputs(con, e)
        total += len(u) + len(sf) + len(nu)
    if denoise_sites:  # one pipeline call per prompt, all sites hooked at once
        total += 2 * len(con.pairs) + len(con.neutral)
    rep.start("probing", total)
    try:
        for site in text_sites:
            enc_spec = fam.encoders[site.encoder]
            if site.encoder not in encoders:
                say(f"loading encoder {site.encoder} ({enc_spec.component}) on {device}")
                encoders[site.encoder] = Encoder(
                    enc_spec, src, opt.encoders.get(site.encoder), device, dtype
                )
            un, sa, ne = _pairs_inputs(con, enc_spec)
            by_group, acts = capture_text(
                src,
                site,
                encoders[site.encoder],
                targets[site.name],
                {"unsafe": un, "safe": sa, "neutral": ne},
                rep.advance,
            )
            for g, ts in by_group.items():
                a = acts[g]
                groups[(site.name, g)] = ts
                caps[(site.name, g)] = Captured(
                    [[x] for x in a["unsafe"]], [[x] for x in a["safe"]], a["neutral"]
                )
        if denoise_sites:
            _capture_denoise(
                src, fam, denoise_sites, targets, con, opt, device, dtype, groups, caps, rep, say
            )
    finally:
        rep.stop()

    entries: list[DeltaEntry] = []
    results_out: list[GroupResult] = []
    for (site_name, g), ts in groups.items():
        cap = caps[(site_name, g)]
        samples = []
        for calls_u, calls_s in zip(cap.unsafe, cap.safe):
            samples.append(
                torch.cat(
                    [
                        pair_differences(xu, mu, xs, ms, pooling)
                        for (xu, mu), (xs, ms) in zip(calls_u, calls_s)
                    ]
                )
            )
        neutral = (
            torch.cat([pool(x, m, pooling) for x, m in cap.neutral]) if method == "cpca" else None
        )
        try:
            d = refusal_directions(
                samples, neutral, method=method, rank=rank, alpha=alpha, directions=ndir
            )
        except ValueError as e:
            raise ProbeError(f"site {site_name} ({g}): {e}") from None
        for t in ts:
            ws = src.weights(t.component)
            W, sha = _read_fingerprinted(ws, t.key)
            comp = fam.sites[site_name].components[0] if src.single is not None else t.component
            entries.append(
                projection_entry(f"{comp}/{t.key}", W, d.B, strength, sha, ws.dtype(t.key))
            )
        results_out.append(
            GroupResult(
                site_name,
                ts[0].component,
                g,
                int(d.B.shape[0]),
                d.samples,
                round(d.kept, 4),
                [t.key for t in ts],
            )
        )

    method_rec = {
        "name": method,
        "rank": rank,
        "alpha": alpha,
        "strength": strength,
        "directions": ndir,
        "pooling": pooling,
        "family": fam.name,
        "sites": site_names,
        "layer_filter": opt.layers,
        "seed": opt.seed,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "denoise_steps": fam.denoise.steps if denoise_sites else None,
        "overrides": opt.overrides,
    }
    delta = Delta(entries, con.record(), method_rec, versions())
    out = Path(out)
    digest = write_delta(out, delta, overwrite=opt.overwrite)
    return ProbeReport(str(out), digest, fam.name, con.name, method_rec, results_out, device)


def _capture_denoise(
    src: ModelSource,
    fam: Family,
    sites: list[SiteSpec],
    targets: dict[str, list[Target]],
    con: Concept,
    opt: ProbeOptions,
    device: str,
    dtype: torch.dtype,
    groups: dict,
    caps: dict,
    rep: Reporter,
    say,
) -> None:
    """Run the pipeline on noise latents with hooks on the site Linears; one call per prompt, same seed."""
    if fam.denoise.runner == "mmdit_video":  # a converted single file, no pipeline: its own sampler
        from .mmdit_video import capture

        return capture(src, fam, sites, targets, con, opt, device, dtype, groups, caps, rep, say)
    if src.single is not None:
        raise ProbeError(
            "denoise-mode sites need a diffusers pipeline folder; original single files can only be probed in text mode"
        )
    DiffusionPipeline = _import("diffusers", "DiffusionPipeline")
    say(
        f"loading the pipeline for denoise-mode sites on {device} (this builds the denoiser; offload: {opt.offload})"
    )
    if opt.offload != "none" and not device.startswith("cuda"):
        raise ProbeError(
            f"--offload {opt.offload} needs a GPU (it moves weights between the GPU and host memory); use --offload none on CPU"
        )
    kwargs = {"torch_dtype": dtype}
    if opt.offload == "balanced":  # accelerate spreads the components over every visible GPU
        kwargs["device_map"] = "balanced"
    try:
        pipe = DiffusionPipeline.from_pretrained(src.root, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ProbeError(
            f"{src.root}: diffusers could not load the pipeline ({str(e).splitlines()[0]})"
        ) from None
    if opt.offload == "model":
        pipe.enable_model_cpu_offload(
            device=device
        )  # accelerate hooks: one component on the GPU at a time
    elif opt.offload == "sequential":
        pipe.enable_sequential_cpu_offload(
            device=device
        )  # one submodule at a time: slowest, least memory
    elif opt.offload == "none":
        pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    call = dict(fam.denoise.call)
    modules: dict[str, torch.nn.Module] = {}
    site_of: dict[str, SiteSpec] = {}
    for site in sites:
        for t in targets[site.name]:
            g = _hooked_group(t)
            groups.setdefault((site.name, g), []).append(t)
            if g not in modules:
                comp = getattr(pipe, t.component, None)
                if comp is None:
                    raise ProbeError(f"pipeline has no component {t.component!r}")
                modules[g] = _find_module(comp, t.module)
                site_of[g] = site

    def select(g: str, x: torch.Tensor) -> torch.Tensor:
        site = site_of[g]
        # the recipes turn guidance off (batch 1); with it on, diffusers batches [uncond, cond]: keep cond
        x = x[-1] if x.dim() == 3 else x
        if site.text_tokens == "all":
            return x
        n = site.text_len if isinstance(site.text_len, int) else int(call.get(site.text_len, 0))
        if n <= 0:
            raise ProbeError(
                f"site {site.name}: text_len {site.text_len!r} is not set in [denoise.call]"
            )
        return x[:n] if site.text_tokens == "first" else x[-n:]

    hooks = _Hooks(modules, select)

    def run(prompt: str) -> dict[str, list[torch.Tensor]]:
        gen = torch.Generator("cpu").manual_seed(opt.seed)
        with torch.inference_mode():
            pipe(
                prompt=prompt,
                num_inference_steps=fam.denoise.steps,
                output_type="latent",
                generator=gen,
                **call,
            )
        rep.advance(1)
        return hooks.take()

    try:
        per_u, per_s = [], []
        for p in con.pairs:
            per_u.append(run(p.unsafe))
            per_s.append(run(p.safe))
        per_n = [run(n) for n in con.neutral]
    finally:
        hooks.remove()
    for g, site in site_of.items():
        un = [[(x, None) for x in r[g]] for r in per_u]
        sa = [[(x, None) for x in r[g]] for r in per_s]
        ne = [(x, None) for r in per_n for x in r[g]]
        if not un[0]:
            raise ProbeError(
                f"site {site.name}: module {g} never ran during the denoise pass; the recipe does not fit this pipeline"
            )
        caps[(site.name, g)] = Captured(un, sa, ne)
