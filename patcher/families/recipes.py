"""Recipes are data: model families (where to edit, how to probe) and concepts (which prompts).

Both are TOML files; the schema is in ``recipes/README.md``. This module only parses and validates
them, so a malformed recipe fails before any model is loaded, with a message that names the field.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..erasure.refusal import METHODS, POOLINGS
from ..errors import RecipeError
from .conversion import Conversion, parse_conversion

# The shipped recipes are package data (the top-level recipes/ folder, linked into the package as
# recipes_data so that a wheel carries it); VPATCH_RECIPES adds user folders in front of it.
RECIPES_DIR = Path(str(importlib.resources.files("patcher.families") / "recipes_data"))
USER_RECIPES_ENV = "VPATCH_RECIPES"
MAX_RECIPE_BYTES = 1 << 20
ENCODER_KINDS = ("text", "pooled", "image", "pipeline")
MASKS = ("attention", "all")
MODES = ("text", "denoise")
# denoise mode runs the diffusers pipeline, or samples a converted single file (patcher/probe/mmdit_video.py)
RUNNERS = ("pipeline", "mmdit_video")
TOKEN_SLICES = ("all", "first", "last")
CHAIN_OPS = {
    "linear": True,
    "layer_norm": True,
    "rms_norm": True,
    "gelu": False,
    "gelu_tanh": False,
    "silu": False,
}  # op -> needs weight
_OUTPUT_RE = re.compile(
    r"^(last_hidden_state|pooler_output|text_embeds|image_embeds|hidden_states:-?\d+)$"
)


# --------------------------------------------------------------------------- small typed readers


class _Table:
    """A TOML table that remembers its path, so every error names the field."""

    def __init__(self, data: dict, where: str):
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def _err(self, key: str, msg: str) -> RecipeError:
        return RecipeError(f"{self.where}: field '{key}' {msg}")

    def get(
        self, key: str, kind: type | tuple, default: Any = ..., choices: tuple | None = None
    ) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self._err(key, "is required")
            return default
        val = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(val, bool) and bool not in kinds:
            raise self._err(key, f"must be {' or '.join(k.__name__ for k in kinds)}, not a boolean")
        if float in kinds and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if not isinstance(val, kinds):
            raise self._err(
                key, f"must be {' or '.join(k.__name__ for k in kinds)}, got {type(val).__name__}"
            )
        if choices is not None and val not in choices:
            raise self._err(key, f"is {val!r}; choose one of {', '.join(map(str, choices))}")
        return val

    def strings(self, key: str, default: Any = ..., min_len: int = 0) -> list[str]:
        val = self.get(key, list, default)
        if not all(isinstance(v, str) and v.strip() for v in val):
            raise self._err(key, "must be a list of non-empty strings")
        if len(val) < min_len:
            raise self._err(key, f"needs at least {min_len} entries, has {len(val)}")
        return list(val)

    def table(self, key: str, default: Any = ...) -> _Table:
        val = self.get(key, dict, default)
        return _Table(val if val is not None else {}, f"{self.where}.{key}")

    def positive(self, key: str, default: Any = ...) -> int:
        val = self.get(key, int, default)
        if val is not None and val < 1:
            raise self._err(key, f"must be a positive integer, got {val}")
        return val

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise RecipeError(
                f"{self.where}: unknown field(s) {', '.join(extra)}; check the spelling against recipes/README.md"
            )


def _regex(t: _Table, key: str) -> list[re.Pattern]:
    out = []
    for i, pat in enumerate(t.strings(key, min_len=1)):
        try:
            out.append(re.compile(pat))
        except re.error as e:
            raise RecipeError(
                f"{t.where}: field '{key}[{i}]' is not a valid regular expression ({e})"
            ) from None
    return out


def _load_toml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: recipe is larger than {MAX_RECIPE_BYTES} bytes")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None


def apply_overrides(data: dict, sets: list[str]) -> dict:
    """``--set a.b.c=VALUE`` edits on the raw TOML (VALUE is parsed as TOML, else taken as a string)."""
    for s in sets:
        if "=" not in s:
            raise RecipeError(f"--set {s!r}: expected dotted.key=value, e.g. --set denoise.steps=2")
        key, raw = s.split("=", 1)
        try:
            val = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            val = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {s!r}: {p!r} is not a table")
            node = nxt
        node[parts[-1]] = val
    return data


# --------------------------------------------------------------------------- model families


@dataclass
class EncoderSpec:
    name: str
    kind: str  # text | pooled | image
    component: str  # pipeline subfolder holding the encoder
    preprocessor: str  # tokenizer (text) or image processor folder
    output: str
    max_length: int
    mask: str
    pass_mask: bool = True  # whether the pipeline gives the encoder the attention mask
    template: str = "{}"
    crop_start: int = 0
    model_class: str | None = None  # used when there is no model_index.json (original layouts)
    preprocessor_class: str | None = None
    hub_id: str | None = None  # default source when the checkpoint does not bundle the encoder
    template_from: str | None = (
        None  # "module:ATTR" naming a {"template", "crop_start"} dict, e.g. a pipeline's default
    )
    # kind = "pipeline": the pipeline's own prompt encoding, built from its text components only
    pipeline: PipelineEncoding | None = None


@dataclass(frozen=True)
class PipelineEncoding:
    """How a ``kind = "pipeline"`` encoder calls the pipeline's own method (``encode_prompt``).

    The pipeline class is built with only ``components`` loaded (the denoiser and VAE are absent),
    so templates, masks, hidden-layer choices and connectors are the library's, never re-described.
    """

    components: tuple[
        str, ...
    ]  # pipeline components loaded (tokenizers, text encoders, connectors)
    method: str = "encode_prompt"
    prompt_arg: str = "prompt"
    kwargs: tuple[tuple[str, Any], ...] = ()  # the call's keyword arguments (max_sequence_length)
    result: int | str = 0  # which output of the method the site reads (index or key)
    mask: int | str | None = None  # which output is its token mask (None: every position counts)
    then: str | None = None  # a component module applied next to (output, mask), e.g. connectors
    then_kwargs: tuple[tuple[str, Any], ...] = ()
    then_result: int | str = 0
    pipeline_class: str | None = None  # when model_index.json does not name it
    # arguments the method shares with the pipeline's __call__ take __call__'s defaults (what a user
    # running the pipeline gets: Sana's complex_human_instruction, max_sequence_length), then kwargs
    call_defaults: bool = True


@dataclass
class ChainOp:
    op: str
    weight: str | None = (
        None  # module path inside the site's component (``.weight``/``.bias`` appended)
    )
    # the component holding ``weight`` when it is not the site's own (a text encoder's final norm that
    # a pipeline applies to a hidden layer it picks); a wrapper prefix there (``text_model.``) is allowed
    component: str | None = None
    eps: float | None = (
        None  # norms: the module's epsilon (default: layer_norm 1e-5, rms_norm 1e-6)
    )


@dataclass
class SiteSpec:
    name: str
    why: str
    mode: str
    components: list[str]
    weights: list[re.Pattern]
    encoder: str | None = None
    chain: list[ChainOp] = field(default_factory=list)
    text_tokens: str = "all"
    text_len: int | str | None = None
    last: int | None = None  # keep only the last N layers (by the first index in the key)
    # a stored (positions, encoder width) tensor that the unconditional branch of guidance reads in
    # place of the encoder output (a learned null caption), in the site's own component; declaring it
    # also says that masked positions never reach the site's readers (recipes/README.md)
    null_caption: str | None = None

    def matches(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self.weights)


@dataclass
class Rename:
    """One key of another layout: the diffusers key ``diffusers`` (a regex) is stored as ``stored``
    (a template: ``{1}`` is the first group), optionally as one row block of a fused tensor."""

    layout: str  # a name users recognise ("original", "sat"), shown by inspect
    diffusers: re.Pattern
    stored: str
    split: tuple[int | str, ...] | None = (
        None  # fused rows: ints, "out" (the entry's out dim), one "rest"
    )
    part: int | None = None  # which block of ``split`` the entry is

    def apply(self, key: str) -> str | None:
        m = self.diffusers.fullmatch(key)
        return None if m is None else self.stored.format(m.group(0), *m.groups())

    def rows(self, out: int, total: int) -> tuple[int, int] | None:
        """The entry's row block in a fused tensor of ``total`` rows, or None if the split does not add up."""
        assert self.split is not None and self.part is not None
        fixed = [out if s == "out" else s for s in self.split]
        known = sum(s for s in fixed if isinstance(s, int))
        sizes = [total - known if s == "rest" else s for s in fixed]
        if any(s <= 0 for s in sizes) or sum(sizes) != total:
            return None
        a = sum(sizes[: self.part])
        return a, a + sizes[self.part]


@dataclass
class DenoiseSpec:
    steps: int = 4
    call: dict = field(default_factory=dict)
    # mmdit_video: a single file converted by [convert], sampled without a pipeline
    runner: str = "pipeline"
    # call arguments that take the conditioning image (image-to-video pipelines; a pipeline without the
    # argument gets none): each prompt gets its pair's image (neutral prompts: the concept's
    # neutral_images), or mid-grey when the concept has none
    images: tuple[str, ...] = ()


@dataclass
class Family:
    name: str
    description: str
    pipeline_classes: list[str]
    detect_keys: list[str]
    encoders: dict[str, EncoderSpec]
    sites: dict[str, SiteSpec]
    default_sites: list[str]
    defaults: dict
    denoise: DenoiseSpec
    key_prefixes: list[str] = field(
        default_factory=list
    )  # optional prefixes of stored keys (aliases)
    key_renames: list[Rename] = field(
        default_factory=list
    )  # other layouts' names for diffusers keys
    convert: Conversion | None = None  # how a single file becomes a module diffusers runs
    path: Path | None = None


DEFAULTS = {
    "method": "cpca",
    "rank": 100,
    "alpha": 1.0,
    "strength": 1.0,
    "directions": 1,
    "pooling": "tokens",
}


def _index(t: _Table, key: str, default: Any) -> int | str | None:
    val = t.get(key, (int, str), default)
    if isinstance(val, str) and not val:
        raise RecipeError(f"{t.where}: field '{key}' must be an output index or a non-empty name")
    return val


def _pipeline_encoding(t: _Table) -> PipelineEncoding:
    comps = t.strings("components", min_len=1)
    method = t.get("method", str, "encode_prompt")
    if not method.isidentifier() or method.startswith("__"):
        raise RecipeError(f"{t.where}: field 'method' must name a method of the pipeline")
    then = t.get("then", str, None)
    if then is not None and then not in comps:
        raise RecipeError(
            f"{t.where}: field 'then' is {then!r}; it must be one of the loaded components {comps}"
        )
    return PipelineEncoding(
        components=tuple(comps),
        method=method,
        prompt_arg=t.get("prompt_arg", str, "prompt"),
        kwargs=tuple(sorted(t.get("kwargs", dict, {}).items())),
        result=_index(t, "result", 0),
        mask=_index(t, "mask_result", None),
        then=then,
        then_kwargs=tuple(sorted(t.get("then_kwargs", dict, {}).items())),
        then_result=_index(t, "then_result", 0),
        pipeline_class=t.get("pipeline_class", str, None),
        call_defaults=t.get("call_defaults", bool, True),
    )


def _encoder(name: str, t: _Table) -> EncoderSpec:
    kind = t.get("kind", str, choices=ENCODER_KINDS)
    if kind == "pipeline":
        enc = _pipeline_encoding(t)
        spec = EncoderSpec(
            name=name,
            kind=kind,
            component=t.get("component", str, enc.components[0]),
            preprocessor="",
            output="last_hidden_state",
            max_length=0,  # the method's own kwargs (max_sequence_length) decide
            mask=t.get("mask", str, "attention" if enc.mask is not None else "all", MASKS),
            hub_id=t.get("hub_id", str, None),
            pipeline=enc,
        )
        if spec.mask == "attention" and enc.mask is None:
            raise RecipeError(
                f"{t.where}: mask = \"attention\" needs 'mask_result' (which output of {enc.method} is the mask)"
            )
        t.done()
        return spec
    output = t.get("output", str, "pooler_output" if kind == "pooled" else "last_hidden_state")
    if not _OUTPUT_RE.match(output):
        raise RecipeError(
            f"{t.where}: field 'output' is {output!r}; use last_hidden_state, pooler_output, text_embeds, image_embeds or hidden_states:N"
        )
    template = t.get("template", str, "{}")
    if template.count("{}") != 1:
        raise RecipeError(
            f"{t.where}: field 'template' must contain exactly one {{}} where the prompt goes"
        )
    spec = EncoderSpec(
        name=name,
        kind=kind,
        component=t.get("component", str),
        preprocessor=t.get(
            "preprocessor", str, "image_processor" if kind == "image" else "tokenizer"
        ),
        output=output,
        max_length=t.positive("max_length", 77),
        mask=t.get("mask", str, "attention", MASKS),
        pass_mask=t.get("pass_mask", bool, None),
        template=template,
        crop_start=t.get("crop_start", int, 0),
        model_class=t.get("class", str, None),
        preprocessor_class=t.get("preprocessor_class", str, None),
        hub_id=t.get("hub_id", str, None),
        template_from=t.get("template_from", str, None) or None,
    )
    if spec.template_from is not None and ":" not in spec.template_from:
        raise RecipeError(
            f"{t.where}: field 'template_from' must look like 'package.module:ATTRIBUTE'"
        )
    if spec.pass_mask is None:
        spec.pass_mask = spec.mask == "attention"
    if spec.crop_start < 0:
        raise RecipeError(f"{t.where}: field 'crop_start' must be >= 0")
    t.done()
    return spec


def _site(name: str, t: _Table, encoders: dict[str, EncoderSpec]) -> SiteSpec:
    why = t.get("why", str)
    mode = t.get("mode", str, choices=MODES)
    comps = t.strings("components", min_len=1)
    weights = _regex(t, "weights")
    enc = t.get("encoder", str, None)
    if mode == "text" and enc is None:
        raise RecipeError(
            f"{t.where}: field 'encoder' is required for a text-mode site (which encoder's output the site reads)"
        )
    if enc is not None and enc not in encoders:
        raise RecipeError(
            f"{t.where}: field 'encoder' is {enc!r}, but the recipe defines encoders {sorted(encoders)}"
        )
    chain = []
    for i, raw in enumerate(t.get("chain", list, [])):
        if not isinstance(raw, dict):
            raise RecipeError(
                f"{t.where}: field 'chain[{i}]' must be a table like {{op = \"linear\", weight = \"...\"}}"
            )
        ct = _Table(raw, f"{t.where}.chain[{i}]")
        op = ct.get("op", str, choices=tuple(CHAIN_OPS))
        w = ct.get("weight", str, None)
        if CHAIN_OPS[op] and not w:
            raise RecipeError(f"{ct.where}: field 'weight' is required for op {op!r}")
        comp = ct.get("component", str, None)
        if comp is not None and not w:
            raise RecipeError(f"{ct.where}: field 'component' needs a 'weight' to read from it")
        eps = ct.get("eps", float, None)
        if eps is not None and (op not in ("layer_norm", "rms_norm") or eps <= 0):
            raise RecipeError(f"{ct.where}: field 'eps' is a positive number, for norm ops only")
        ct.done()
        chain.append(ChainOp(op, w, component=comp, eps=eps))
    if mode == "denoise" and chain:
        raise RecipeError(f"{t.where}: field 'chain' only applies to text-mode sites")
    text_tokens = t.get("text_tokens", str, "all", TOKEN_SLICES)
    text_len = t.get("text_len", (int, str), None)
    last = t.positive("last", None)
    null_caption = t.get("null_caption", str, None)
    if null_caption is not None and (mode != "text" or not null_caption.strip()):
        raise RecipeError(
            f"{t.where}: field 'null_caption' names a stored tensor (non-empty), for text-mode sites only"
        )
    if text_tokens != "all" and text_len is None:
        raise RecipeError(
            f"{t.where}: field 'text_len' is required when text_tokens = {text_tokens!r}"
        )
    t.done()
    return SiteSpec(
        name, why, mode, comps, weights, enc, chain, text_tokens, text_len, last, null_caption
    )


def parse_family(data: dict, where: str) -> Family:
    t = _Table(data, where)
    name = t.get("name", str)
    desc = t.get("description", str, "")
    det = t.table("detect", {})
    pipes = det.strings("pipeline_classes", [])
    keys = det.strings("keys", [])
    det.done()
    if not pipes and not keys:
        raise RecipeError(
            f"{where}: field 'detect' needs pipeline_classes or keys, so the family can be recognised"
        )
    enc_t = t.table("encoders")
    encoders = {}
    for k in list(enc_t.data):
        encoders[k] = _encoder(k, enc_t.table(k))
    site_t = t.table("sites")
    sites = {}
    for k in list(site_t.data):
        sites[k] = _site(k, site_t.table(k), encoders)
    if not sites:
        raise RecipeError(f"{where}: field 'sites' defines no edit site")
    dt = t.table("defaults", {})
    defaults = dict(DEFAULTS)
    sel = dt.get("sites", list, None)
    if sel is None or not sel or not all(isinstance(s, str) for s in sel):
        raise RecipeError(
            f"{where}.defaults: field 'sites' is required: a list of site names (from {sorted(sites)})"
        )
    for s in sel:
        if s not in sites:
            raise RecipeError(
                f"{where}.defaults: field 'sites' names {s!r}, which is not one of {sorted(sites)}"
            )
    defaults["method"] = dt.get("method", str, DEFAULTS["method"], METHODS)
    defaults["rank"] = dt.positive("rank", DEFAULTS["rank"])
    defaults["alpha"] = dt.get("alpha", float, DEFAULTS["alpha"])
    defaults["strength"] = dt.get("strength", float, DEFAULTS["strength"])
    defaults["directions"] = dt.positive("directions", DEFAULTS["directions"])
    defaults["pooling"] = dt.get("pooling", str, DEFAULTS["pooling"], POOLINGS)
    dt.done()
    dn = t.table("denoise", {})
    denoise = DenoiseSpec(
        steps=dn.positive("steps", 4),
        call=dn.get("call", dict, {}),
        runner=dn.get("runner", str, "pipeline", RUNNERS),
        images=tuple(dn.strings("images", [])),
    )
    dn.done()
    at = t.table("aliases", {})
    prefixes = at.strings("prefixes", [])
    renames = [_rename(i, raw, at.where) for i, raw in enumerate(at.get("keys", list, []))]
    at.done()
    convert = parse_conversion(t.table("convert"), _tables) if "convert" in t.data else None
    if denoise.runner != "pipeline" and convert is None:
        raise RecipeError(
            f"{where}.denoise: runner {denoise.runner!r} runs a converted checkpoint; add a [convert] table"
        )
    t.done()
    return Family(
        name,
        desc,
        pipes,
        keys,
        encoders,
        sites,
        list(sel),
        defaults,
        denoise,
        prefixes,
        renames,
        convert,
    )


def _tables(raw: list, where: str) -> list[_Table]:
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RecipeError(f"{where}[{i}]: must be a table")
        out.append(_Table(item, f"{where}[{i}]"))
    return out


def _rename(i: int, raw: object, where: str) -> Rename:
    w = f"{where}.keys[{i}]"
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{w}: must be a table like {{layout = \"original\", diffusers = '...', stored = '...'}}"
        )
    rt = _Table(raw, w)
    layout, pat, stored = rt.get("layout", str), rt.get("diffusers", str), rt.get("stored", str)
    try:
        rx = re.compile(pat)
    except re.error as e:
        raise RecipeError(
            f"{w}: field 'diffusers' is not a valid regular expression ({e})"
        ) from None
    try:
        stored.format(*(["x"] * (rx.groups + 1)))
    except (IndexError, KeyError, ValueError):
        raise RecipeError(
            f"{w}: field 'stored' may only use {{0}}..{{{rx.groups}}} (the regex has {rx.groups} group(s))"
        ) from None
    split, part = rt.get("split", list, None), rt.get("part", int, None)
    if (split is None) != (part is None):
        raise RecipeError(f"{w}: give both 'split' and 'part' for a fused tensor, or neither")
    if split is not None:
        if not split or not all(
            (isinstance(x, int) and not isinstance(x, bool) and x > 0) or x in ("out", "rest")
            for x in split
        ):
            raise RecipeError(
                f"{w}: field 'split' must list row counts: positive integers, \"out\" (the edited weight's rows) or \"rest\""
            )
        if split.count("rest") > 1:
            raise RecipeError(f"{w}: field 'split' may hold \"rest\" once")
        if not 0 <= part < len(split):
            raise RecipeError(
                f"{w}: field 'part' is {part}; it indexes 'split' (0..{len(split) - 1})"
            )
    rt.done()
    return Rename(layout, rx, stored, tuple(split) if split is not None else None, part)


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up, first match wins: each VPATCH_RECIPES folder, then the shipped one."""
    user = [Path(d) for d in os.environ.get(USER_RECIPES_ENV, "").split(os.pathsep) if d]
    for d in user:
        if not d.is_dir():
            raise RecipeError(
                f"{USER_RECIPES_ENV} names {d}, which is not a folder (it should hold models/ and/or concepts/)"
            )
    return [*user, RECIPES_DIR]


def _recipe_files(kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for f in sorted((d / kind).glob("*.toml")):
            found.setdefault(f.stem, f)
    return dict(sorted(found.items()))


def family_files() -> list[Path]:
    return list(_recipe_files("models").values())


@functools.cache
def _parsed(kind: str, path: Path, stamp: tuple[int, int]):
    # one parse per file and version of it per process; callers treat the result as read-only
    if kind == "models":
        fam = parse_family(_load_toml(path), str(path))
        fam.path = path
        return fam
    con = parse_concept(_load_toml(path), str(path), path.parent)
    con.path = path
    return con


def _load(kind: str, path: Path):
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    st = path.stat()
    return _parsed(kind, path.resolve(), (st.st_mtime_ns, st.st_size))


def _named(kind: str, name_or_path: str | os.PathLike, what: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml":
        return p
    files = _recipe_files(kind)
    if str(name_or_path) not in files:
        raise RecipeError(
            f"unknown {what} {str(name_or_path)!r}; known: {', '.join(files) or 'none'} (or give a path "
            f"to a .toml recipe; {USER_RECIPES_ENV} adds folders of your own)"
        )
    return files[str(name_or_path)]


def load_family(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Family:
    """A family by name (``recipes/models/NAME.toml`` or a user folder's) or by path to a TOML file."""
    p = _named("models", name_or_path, "model family")
    if not overrides:
        return _load("models", p)
    fam = parse_family(apply_overrides(_load_toml(p), overrides), str(p))
    fam.path = p
    return fam


def shipped_families() -> list[Family]:
    """Every family recipe on the search path; one that does not parse is an error, not a silent gap."""
    return [_load("models", f) for f in family_files()]


def detect_family(pipeline_class: str | None, keys: set[str]) -> str | None:
    """The family whose recipe claims this pipeline class, else whose detection keys are all present."""
    fams = shipped_families()
    if pipeline_class:
        for fam in fams:
            if pipeline_class in fam.pipeline_classes:
                return fam.name
    from ..layouts import AliasRules  # layouts reads families: imported here, not at module level

    claims = []
    for fam in fams:
        rules = AliasRules(prefixes=list(fam.key_prefixes))
        stripped = set(keys) | {rules.strip(k)[0] for k in keys}
        if fam.detect_keys and all(k in stripped for k in fam.detect_keys):
            claims.append(fam)
    # the most specific claim wins: an LTX-2 or Sana-Video file also holds LTX-Video's two keys
    return max(claims, key=lambda f: len(f.detect_keys)).name if claims else None


# --------------------------------------------------------------------------- concepts


@dataclass
class Pair:
    unsafe: str
    safe: str
    unsafe_image: Path | None = None
    safe_image: Path | None = None


@dataclass
class Concept:
    name: str
    description: str
    pairs: list[Pair]
    neutral: list[str]
    neutral_images: list[Path]
    heldout: dict[str, list[str]]
    judge: dict = field(default_factory=dict)  # per judge: what "the concept is present" means
    path: Path | None = None
    # held-out prompt -> its safe twin, where the pairs' word edits cannot derive one
    twins: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        """What goes into the delta's ``vpatch.concept`` field."""
        return {
            "name": self.name,
            "description": self.description,
            "pairs": [{"unsafe": p.unsafe, "safe": p.safe} for p in self.pairs],
            "neutral": self.neutral,
            "images": any(p.unsafe_image for p in self.pairs),
        }


HELDOUT_KINDS = ("paraphrase", "synonym", "unseen", "template", "free")


def parse_concept(data: dict, where: str, base: Path | None = None) -> Concept:
    t = _Table(data, where)
    name = t.get("name", str)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise RecipeError(
            f"{where}: field 'name' must be letters, digits, '_', '-' or '.', got {name!r}"
        )
    desc = t.get("description", str, "")
    raw_pairs = t.get("pairs", list)
    if not raw_pairs:
        raise RecipeError(
            f"{where}: field 'pairs' is empty; give unsafe/safe pairs that differ only by the concept (5 recommended)"
        )
    pairs = []
    for i, rp in enumerate(raw_pairs):
        if not isinstance(rp, dict):
            raise RecipeError(
                f"{where}: field 'pairs[{i}]' must be a table with 'unsafe' and 'safe'"
            )
        pt = _Table(rp, f"{where}.pairs[{i}]")
        un, sa = pt.get("unsafe", str), pt.get("safe", str)
        if not un.strip() or not sa.strip():
            raise RecipeError(f"{pt.where}: 'unsafe' and 'safe' must be non-empty")
        if un.strip() == sa.strip():
            raise RecipeError(
                f"{pt.where}: 'unsafe' and 'safe' are identical; they must differ by the concept"
            )
        ui, si = pt.get("unsafe_image", str, None), pt.get("safe_image", str, None)
        if (ui is None) != (si is None):
            raise RecipeError(f"{pt.where}: give both 'unsafe_image' and 'safe_image', or neither")
        pt.done()
        pairs.append(Pair(un, sa, _img(ui, base, pt.where), _img(si, base, pt.where)))
    if len({p.unsafe_image is None for p in pairs}) > 1:
        raise RecipeError(f"{where}: field 'pairs': either every pair carries images or none does")
    neutral = t.strings("neutral", min_len=2)
    nimg = [_img(s, base, f"{where}.neutral_images") for s in t.strings("neutral_images", [])]
    ht = t.table("heldout", {})
    heldout = {k: ht.strings(k, []) for k in HELDOUT_KINDS}
    ht.done()
    tt = t.table("twins", {})
    concept_prompts = {q for k in HELDOUT_KINDS if k != "free" for q in heldout[k]}
    twins: dict[str, str] = {}
    for prompt in list(tt.data):
        twin = tt.get(prompt, str)
        if prompt not in concept_prompts:
            raise RecipeError(
                f"{tt.where}: {prompt!r} is not a held-out concept prompt of this recipe (paraphrase,"
                " synonym, unseen or template); a twin is given for one of those"
            )
        if not twin.strip() or twin.strip() == prompt.strip():
            raise RecipeError(
                f"{tt.where}: the twin of {prompt!r} must be a non-empty prompt without the concept"
            )
        twins[prompt] = twin
    tt.done()
    jt = t.table("judge", {})
    judge: dict = {}
    if "organism" in jt.data:
        ot = jt.table("organism")
        judge["organism"] = {
            "attribute": ot.get("attribute", str, choices=("colour", "shape", "motion")),
            "value": ot.get("value", str),
        }
        ot.done()
    if "clip" in jt.data:
        ct = jt.table("clip")
        judge["clip"] = {
            "unsafe": ct.strings("unsafe", min_len=1),
            "safe": ct.strings("safe", min_len=1),
        }
        ct.done()
    jt.done()
    t.done()
    return Concept(name, desc, pairs, neutral, nimg, heldout, judge, twins=twins)


def _img(s: str | None, base: Path | None, where: str) -> Path | None:
    if s is None:
        return None
    p = Path(s)
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.is_file():
        raise RecipeError(
            f"{where}: image {s!r} not found (paths are relative to the concept file)"
        )
    return p


def concept_files() -> list[Path]:
    return list(_recipe_files("concepts").values())


def load_concept(name_or_path: str | os.PathLike) -> Concept:
    """A concept by name (``recipes/concepts/NAME.toml`` or a user folder's) or by path to a TOML file."""
    return _load("concepts", _named("concepts", name_or_path, "concept"))
