"""The encoders a text-mode probe runs: a transformers model plus its tokenizer or image processor.

The libraries are imported lazily (``pip install 'vpatch[probe]'``) and kept quiet: vpatch shows its
own progress.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ProbeError
from ..families.recipes import EncoderSpec
from .sources import ModelSource


def quiet_libraries() -> None:
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


def import_class(lib: str, cls: str):
    quiet_libraries()
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
    index: dict, root: Path, name: str, fallback: str | None, what: str
) -> tuple[str, str]:
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
        return entry[0], entry[1]
    if fallback:
        return "transformers", fallback
    raise ProbeError(
        f"{root}: model_index.json has no {name!r} ({what}); pass --encoder NAME=PATH or fix the recipe"
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
            mcls = import_class("transformers", spec.model_class or "AutoModel")
            pcls = import_class(
                "transformers",
                spec.preprocessor_class
                or ("AutoImageProcessor" if spec.kind == "image" else "AutoTokenizer"),
            )
            root = Path(loc)
            sub = root / spec.preprocessor if (root / spec.preprocessor).is_dir() else root
            try:
                self.model = mcls.from_pretrained(loc, torch_dtype=dtype, use_safetensors=True)
                self.pre = pcls.from_pretrained(str(sub))
            except OSError as e:
                raise ProbeError(
                    f"encoder {spec.name!r} from {loc}: {str(e).splitlines()[0]} "
                    f"Download it, then pass --encoder {spec.name}=LOCAL_FOLDER"
                ) from None
            self.component_dir = root
        else:
            lib, cls = _component_class(
                src.model_index, src.root, spec.component, spec.model_class, "encoder"
            )
            plib, pcls_name = _component_class(
                src.model_index,
                src.root,
                spec.preprocessor,
                spec.preprocessor_class,
                "tokenizer/processor",
            )
            if lib != "transformers":
                raise ProbeError(
                    f"encoder {spec.name!r}: {lib}.{cls} is not a transformers model; vpatch hooks transformers encoders"
                )
            mcls, pcls = import_class(lib, cls), import_class(plib, pcls_name)
            try:  # safetensors only: a folder holding just pickles is refused, never unpickled
                self.model = mcls.from_pretrained(
                    src.root / spec.component, torch_dtype=dtype, use_safetensors=True
                )
                self.pre = pcls.from_pretrained(src.root / spec.preprocessor)
            except (OSError, ValueError) as e:
                raise ProbeError(
                    f"encoder {spec.name!r} in {src.root / spec.component}: {str(e).splitlines()[0]}"
                ) from None
            self.component_dir = src.root / spec.component
        self.model.to(device).eval()
        self.modules = {spec.component: self.model}  # what a site inside the encoder is hooked on
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


class _Config(dict):
    """An absent component's config.json as attributes; a field it lacks reads as None."""

    def __getattr__(self, name: str):
        return self.get(name)


class _Absent:
    """Stands for a component a text-mode probe does not load (the denoiser, the VAE).

    Falsy, so a pipeline's ``x if getattr(self, "vae", None) else default`` takes the default; its
    ``config`` is the component's own config.json, for constructors that read one unguarded.
    """

    def __init__(self, config: dict):
        self.config = _Config(config)

    def __bool__(self) -> bool:
        return False


def _pick(out, which: int | str, what: str, method: str):
    """One output of a pipeline method: an index into a tuple, or a key of a dict/ModelOutput."""
    try:
        if isinstance(which, int):
            return out[which] if isinstance(out, tuple | list) else out.to_tuple()[which]
        return out[which] if isinstance(out, dict) else getattr(out, which)
    except (IndexError, KeyError, AttributeError, TypeError):
        raise ProbeError(
            f"{method} has no output {which!r} ({what}); fix the family recipe's encoder"
        ) from None


def _library_class(lib: str, cls: str):
    """A model_index.json class: a library's (transformers, diffusers) or, as diffusers resolves a
    pipeline's own modules (LTX-2's ``["ltx2", "LTX2TextConnectors"]``), ``diffusers.pipelines.LIB``'s."""
    import importlib

    if lib in ("transformers", "diffusers"):
        return import_class(lib, cls)
    try:
        return getattr(importlib.import_module(f"diffusers.pipelines.{lib}"), cls)
    except (ImportError, AttributeError):
        return import_class(lib, cls)


class PipelineEncoder:
    """The pipeline's own prompt encoding (``encode_prompt``), with only its text components loaded.

    The pipeline class is constructed directly with the recipe's components (tokenizers, text
    encoders, connectors) and every other component absent, so the denoiser and the VAE are never
    built. Each prompt is encoded alone, as the pipeline encodes one prompt.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        src: ModelSource,
        override: str | None,
        device: str,
        dtype: torch.dtype,
    ):
        import inspect
        import json

        assert spec.pipeline is not None
        self.spec, self.enc, self.device = spec, spec.pipeline, device
        self.template, self.crop_start = "{}", 0
        if override is not None or src.single is not None:
            loc = override or spec.hub_id
            if loc is None:
                raise ProbeError(
                    f"encoder {spec.name!r}: the checkpoint does not bundle it; pass --encoder "
                    f"{spec.name}=FOLDER (a diffusers pipeline folder holding {', '.join(self.enc.components)})"
                )
            from .. import hub
            from .sources import open_source

            pats = ["model_index.json", "*/config.json"] + [  # from a hub id: the text stack only
                f"{c}/{p}" for c in self.enc.components for p in (*hub.SIDECARS, "*.safetensors")
            ]
            root_src = open_source(loc, None, pats)
            if root_src.single is not None:
                raise ProbeError(
                    f"encoder {spec.name!r}: {loc} is a single file; give a diffusers pipeline folder"
                )
            root, index = root_src.root, root_src.model_index
        else:
            root, index = src.root, src.model_index
        cls_name = self.enc.pipeline_class or index.get("_class_name")
        if not isinstance(cls_name, str):
            raise ProbeError(
                f"encoder {spec.name!r}: {root} names no pipeline class; set pipeline_class in the recipe"
            )
        pcls = import_class("diffusers", cls_name)
        params = [
            n
            for n, p in inspect.signature(pcls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        self.modules: dict[str, torch.nn.Module] = {}
        loaded: dict = {}
        for name in self.enc.components:
            lib, cls = _component_class(index, root, name, None, "component")
            c = _library_class(lib, cls)
            try:  # models from safetensors only: a folder holding just pickles is refused
                if isinstance(c, type) and issubclass(c, torch.nn.Module):
                    obj = c.from_pretrained(root / name, torch_dtype=dtype, use_safetensors=True)
                    obj = obj.to(device).eval()
                    self.modules[name] = obj
                else:
                    obj = c.from_pretrained(root / name)
            except (OSError, ValueError, AttributeError) as e:
                raise ProbeError(
                    f"encoder {spec.name!r}: component {name} in {root}: {str(e).splitlines()[0]}"
                ) from None
            loaded[name] = obj
        self.model = self.modules.get(spec.component) or next(iter(self.modules.values()), None)
        self.component_dir = root / spec.component

        def absent(name: str):
            cfg = root / name / "config.json"
            try:
                return _Absent(json.loads(cfg.read_text()) if cfg.is_file() else {})
            except (ValueError, RecursionError):
                return _Absent({})

        others = [n for n in params if n not in loaded]
        try:  # absent components as None first: what diffusers itself passes for a skipped one
            self.pipe = pcls(**loaded, **{n: None for n in others})
        except (AttributeError, TypeError, ImportError):  # reads an absent one's config, or builds
            # a default for it from an optional package (Cosmos 2.5's guardrail)
            try:
                self.pipe = pcls(**loaded, **{n: absent(n) for n in others})
            except Exception as e:  # a diffusers whose constructor this recipe does not fit
                import diffusers

                raise ProbeError(
                    f"encoder {spec.name!r}: {cls_name} cannot be built from its text components "
                    f"alone with diffusers {diffusers.__version__} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"
                ) from None
        self.pipe.set_progress_bar_config(disable=True)
        method = getattr(self.pipe, self.enc.method, None)
        if not callable(method):
            raise ProbeError(f"{cls_name} has no method {self.enc.method!r}; fix the family recipe")
        self.method = method
        self.takes = set(inspect.signature(method).parameters)
        self.defaults: dict = {}
        if self.enc.call_defaults:  # what a user running the pipeline gets
            for n, p in inspect.signature(pcls.__call__).parameters.items():
                if n in self.takes and n != self.enc.prompt_arg and p.default is not p.empty:
                    self.defaults[n] = p.default

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, tokens, H) or (1, H) as the pipeline hands it on, and its (1, tokens) mask or None."""
        enc = self.enc
        kw = {**self.defaults, **dict(enc.kwargs)}
        if "device" in self.takes and "device" not in kw:
            kw["device"] = torch.device(self.device)
        with torch.inference_mode():
            try:
                out = self.method(**{enc.prompt_arg: [prompt]}, **kw)
            except TypeError as e:  # the recipe's kwargs do not fit the method's signature
                raise ProbeError(
                    f"{enc.method}: {str(e).splitlines()[0]}; fix the family recipe's kwargs"
                ) from None
            x = _pick(out, enc.result, "result", enc.method)
            mask = None if enc.mask is None else _pick(out, enc.mask, "mask_result", enc.method)
            if enc.then is not None:
                then = self.modules[enc.then]
                nxt = then(x, mask, **dict(enc.then_kwargs))
                x = _pick(nxt, enc.then_result, "then_result", enc.then)
        if not isinstance(x, torch.Tensor):
            raise ProbeError(f"{enc.method} output {enc.result!r} is not a tensor")
        return x, mask

    def __call__(self, items: list) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        res = []
        for prompt in items:
            x, mask = self.encode(prompt)
            x = x.float().cpu()
            if x.dim() == 2:  # pooled: one "token" per prompt
                res.append((x[:1], None))
                continue
            m = None
            if self.spec.mask == "attention" and mask is not None:
                m = mask.reshape(x.shape[0], -1)[0].bool().cpu()
                if m.shape[0] != x.shape[1]:
                    raise ProbeError(
                        f"encoder {self.spec.name!r}: mask has {m.shape[0]} positions, output {x.shape[1]}"
                    )
            res.append((x[0], m))
        return res


def make_encoder(
    spec: EncoderSpec, src: ModelSource, override: str | None, device: str, dtype: torch.dtype
) -> Encoder | PipelineEncoder:
    """The encoder a recipe declares: a transformers model, or the pipeline's own encoding."""
    if spec.kind == "pipeline":
        return PipelineEncoder(spec, src, override, device, dtype)
    return Encoder(spec, src, override, device, dtype)
