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
            mcls = import_class("transformers", spec.model_class or "AutoModel")
            pcls = import_class(
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
            self.model = import_class(lib, cls).from_pretrained(
                src.root / spec.component, torch_dtype=dtype
            )
            self.pre = import_class(plib, pcls_name).from_pretrained(src.root / spec.preprocessor)
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
