"""Where the probe's weights come from: a model folder, a single file or a hub id, and its base weights.

``open_model`` opens what the user named (fetching only safetensors and sidecars from the hub, never
pickles). ``WeightReader`` hands the direction math the target weights W it needs for U = -λ W B.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import hub
from ..checkpoint import WeightSet, load_single, scan_folder
from ..errors import ProbeError
from ..families.recipes import Family, SiteSpec, detect_family, load_family
from ..safetensors_io import TensorReader, bytes_to_tensor

if TYPE_CHECKING:
    from .activations import Activations, TargetWeight
    from .capture import CaptureOptions


@dataclass
class ModelSource:
    """Where the weights are: a diffusers folder (components) or one original-layout file."""

    root: Path
    pipeline_class: str | None
    model_index: dict
    single: WeightSet | None = None  # original single-file layout
    origin: str = (
        ""  # what the user named (path or hub id): recorded so a later build can reopen it
    )

    def weights(self, component: str) -> WeightSet | None:
        if self.single is not None:
            return self.single
        folder = self.root / component
        if not folder.is_dir():
            return None
        sets, _pickles = scan_folder(folder)
        plain = [ws for ws in sets if ws.variant is None]
        return (plain or sets or [None])[0]

    def keys(self) -> set[str]:
        if self.single is not None:
            return set(self.single.key_file)
        return set()


def hub_patterns(fam: Family, sites: list[SiteSpec]) -> list[str]:
    """The files a probe of these sites needs from a hub repository (never a whole folder)."""
    pats = ["model_index.json"]
    if any(s.mode == "denoise" for s in sites):
        return pats + [f"*/{p}" for p in (*hub.SIDECARS, "*.safetensors")]
    for s in sites:
        for c in s.components:
            pats += [f"{c}/*.json", f"{c}/*.safetensors"]
        enc = fam.encoders.get(s.encoder or "")
        if enc is not None:  # never "folder/*": a folder may also hold pickles
            dirs = enc.pipeline.components if enc.pipeline else (enc.component, enc.preprocessor)
            pats += [f"{d}/{p}" for d in dirs for p in (*hub.SIDECARS, "*.safetensors")]
            if enc.pipeline:  # absent components' configs (a constructor may read one)
                pats += ["*/config.json"]
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
        return ModelSource(p.parent, None, {}, single=load_single(p), origin=str(model))
    idx = p / "model_index.json"
    if idx.is_file():
        try:
            mi = json.loads(idx.read_text())
        except (ValueError, RecursionError):
            raise ProbeError(f"{idx}: not valid JSON") from None
        return ModelSource(p, mi.get("_class_name"), mi, origin=str(model))
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return ModelSource(p, None, {}, single=load_single(files[0]), origin=str(model))
    raise ProbeError(
        f"{p}: not a diffusers folder (no model_index.json) and not a single .safetensors checkpoint"
    )


def open_model(model: str | Path | ModelSource, options: CaptureOptions) -> ModelSource:
    """Open MODEL for a probe with these options; from a hub id, fetch only what the sites read."""
    if isinstance(model, ModelSource):
        return model
    patterns = None
    if options.family:
        fam = load_family(options.family, options.overrides)
        names = options.sites or fam.default_sites
        patterns = hub_patterns(fam, [fam.sites[n] for n in names if n in fam.sites])
    return open_source(model, options.revision, patterns)


def resolve_family(src: ModelSource, name: str | None, overrides: list[str]) -> Family:
    if name is None:
        name = detect_family(src.pipeline_class, src.keys())
        if name is None:
            what = src.pipeline_class or "this checkpoint's keys"
            raise ProbeError(
                f"cannot tell the model family from {what}; pass --family (see `vpatch families`)"
            )
    return load_family(name, overrides)


# --------------------------------------------------------------------------- base weights


@dataclass(frozen=True)
class BaseWeight:
    W: torch.Tensor  # fp32
    sha256: str  # of the stored bytes (the digest apply computes row block by row block)
    dtype: str  # the stored safetensors dtype


class WeightReader:
    """The target weights W of one model source, each read once and kept for every later build.

    Why a reader and not weights inside ``Activations``: the edit U = -λ W B needs every target W, and
    those weights are often gigabytes (80 cross-attention matrices of a 14B model), while the captured
    activations are megabytes. So activations stay small and portable, and W comes from the model
    itself; the fingerprint recorded at capture proves at build time that it is the same W.

    Why keep W: a search over λ, k and α builds many deltas from one capture, and each needs every W;
    reading each once makes a build cost only the direction math. The stored dtype is kept (a bf16
    checkpoint costs half of fp32) and widened to fp32 per use, which is exact. ``keep=False`` reads
    from disk on every use instead.
    """

    def __init__(self, source: ModelSource, keep: bool = True):
        self.source = source
        self.keep = keep
        self._stored: dict[tuple[str, str], tuple[torch.Tensor, str, str]] = {}

    @classmethod
    def for_activations(
        cls, acts: Activations, model: str | Path | None = None, keep: bool = True
    ) -> WeightReader:
        """Reopen the model the activations were captured from (or MODEL, e.g. after a move)."""
        loc = model if model is not None else acts.capture.model
        comps = sorted({t.component for g in acts.groups for t in g.targets})
        patterns = ["model_index.json"] + [  # from a hub id: only the edited components
            f"{c}/{p}" for c in comps for p in (*hub.SIDECARS, "*.safetensors")
        ]
        revision = acts.capture.revision if model is None else None
        return cls(open_source(loc, revision, patterns), keep)

    def _load(self, component: str, key: str) -> tuple[torch.Tensor, str, str]:
        hit = self._stored.get((component, key))
        if hit is not None:
            return hit
        ws = self.source.weights(component)
        f = None if ws is None else ws.key_file.get(key)
        if f is None:
            raise ProbeError(
                f"{component}/{key} is not in {self.source.origin or self.source.root}; "
                "build with the model the activations were captured from (--model PATH)"
            )
        h = ws.headers[f]
        t = h.tensors[key]
        with TensorReader(h) as rd:
            raw = rd.raw(key)
        val = (bytes_to_tensor(raw, t.dtype, t.shape), hashlib.sha256(raw).hexdigest(), t.dtype)
        if self.keep:
            self._stored[(component, key)] = val
        return val

    def read(self, component: str, key: str) -> BaseWeight:
        """W (fp32), the sha256 of its stored bytes and its stored dtype."""
        stored, sha, dtype = self._load(component, key)
        return BaseWeight(stored.to(torch.float32), sha, dtype)

    def target(self, t: TargetWeight) -> torch.Tensor:
        """W of a captured target in fp32, after checking it is the weight the capture fingerprinted."""
        b = self.read(t.component, t.key)
        if b.sha256 != t.sha256:
            raise ProbeError(
                f"{t.component}/{t.key}: this weight differs from the one the activations were captured "
                f"from (sha256 {b.sha256[:12]}..., captured {t.sha256[:12]}...); build with that model "
                "or capture again"
            )
        return b.W
