"""Edit sites: which stored weights a site targets, and what those weights read.

A site (from the family recipe) names weight patterns in one or more components. Its targets are
the matching 2-D weights; targets of one parent module read one input, so they share one direction.
For text-mode sites outside the encoder, ``run_chain`` recomputes the few small modules between the
encoder output and the site (e.g. a caption projection) from the stored weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import WeightSet
from ..errors import ProbeError
from ..families.recipes import SiteSpec
from ..layouts import AliasRules
from ..safetensors_io import TensorReader
from .sources import ModelSource

_LAYER_IDX = re.compile(r"\.(\d+)\.")


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


def hooked_group(t: Target) -> str:
    """Hooked Linears of one parent module (to_k/to_v of one attention) read one input: one direction."""
    return f"{t.component}:{t.module.rsplit('.', 1)[0]}:{t.in_dim}"


def _read(ws: WeightSet, key: str) -> torch.Tensor:
    f = ws.key_file.get(key)
    if f is None:
        raise ProbeError(
            f"weight {key} is missing from {ws.label}; the recipe's chain does not fit this checkpoint"
        )
    with TensorReader(ws.headers[f]) as rd:
        return rd.tensor(key).to(torch.float32)


def _other_component(
    weights_of: Callable[[str], WeightSet | None] | None, comp: str, module: str
) -> tuple[WeightSet, str]:
    """A chain op's weights in another component, and the wrapper prefix its keys carry there."""
    ws = weights_of(comp) if weights_of is not None else None
    if ws is None:
        raise ProbeError(
            f"the recipe's chain reads {comp}/{module}, but this checkpoint has no {comp}"
        )
    for key in sorted(ws.key_file, key=len):
        if key == f"{module}.weight" or key.endswith(f".{module}.weight"):
            return ws, key[: -len(f"{module}.weight")]
    raise ProbeError(
        f"weight {module}.weight is missing from {ws.label}; the recipe's chain does not fit"
    )


def run_chain(
    site: SiteSpec,
    ws: WeightSet,
    x: torch.Tensor,
    prefix: str = "",
    weights_of: Callable[[str], WeightSet | None] | None = None,
) -> torch.Tensor:
    """The few modules between the encoder output and the site (e.g. a caption projection), in fp32.
    ``prefix``: the wrapper prefix the site's own keys carry in this file (``model.diffusion_model.``);
    ``weights_of``: a component's weights, for ops that read another component (``component = ...``)."""
    F = torch.nn.functional
    site_ws, site_prefix = ws, prefix
    for op in site.chain:
        ws, prefix = site_ws, site_prefix
        if op.component is not None:
            ws, prefix = _other_component(weights_of, op.component, str(op.weight))
        if op.op == "linear":
            W = _read(ws, f"{prefix}{op.weight}.weight")
            b_key = f"{prefix}{op.weight}.bias"
            x = F.linear(x, W, _read(ws, b_key) if b_key in ws.key_file else None)
        elif op.op == "layer_norm":
            w_key, b_key = f"{prefix}{op.weight}.weight", f"{prefix}{op.weight}.bias"
            w = _read(ws, w_key) if w_key in ws.key_file else None
            b = _read(ws, b_key) if b_key in ws.key_file else None
            eps = op.eps if op.eps is not None else (1e-5 if w is not None else 1e-6)
            x = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps=eps)
        elif op.op == "rms_norm":  # as diffusers' RMSNorm: x / rms(x), times the weight if stored
            w_key = f"{prefix}{op.weight}.weight"
            eps = op.eps if op.eps is not None else 1e-6
            x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            if w_key in ws.key_file:
                x = x * _read(ws, w_key)
        elif op.op == "gelu":
            x = F.gelu(x)
        elif op.op == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif op.op == "silu":
            x = F.silu(x)
    return x


def find_module(
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


class Hooks:
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
