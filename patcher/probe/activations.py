"""``Activations``: what a capture saw at every edit site, kept so that many deltas can be built from it.

A capture runs the encoder (or the pipeline) once; ``build.build_delta`` then turns the activations
into a delta for any method parameters without running a model again. Saved, activations are a
safetensors file (tensors) with a JSON description in its metadata; they are never pickled, and
reading checks every field, shape and a content hash, failing with a one-line ``ActivationsError``.

Layout of the data, per group of targets that read one input (``GroupActivations``):
- ``roles``: ``unsafe`` and ``safe`` (index-aligned: pair i is ``unsafe[i]`` / ``safe[i]``) and
  ``neutral``. Each role holds one entry per prompt, each prompt one ``Capture`` per forward call
  that fed the site (text mode: one; denoise mode: one per step and call).
- a ``Capture`` keeps token-level activations (valid tokens only, padding dropped) and each token's
  position in its sequence, so methods that pool and methods that align tokens can both use it.
A new method or concept source can add roles (e.g. preservation prompts) without a format change.
A role whose rows are not the group's input width (the twin's token-id columns, (n, 1)) records its
``width`` in the description.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ActivationsError, FormatError
from ..safetensors_io import DTYPE_BITS, TensorReader, read_header, save_tensors

FORMAT = "vpatch-activations"
FORMAT_VERSION = 1
PAIR_ROLES = ("unsafe", "safe")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class TargetWeight:
    """One weight the delta will edit, as it was when captured."""

    component: str
    key: str  # stored key in the component's weights
    delta_key: str  # "component/key" as the delta names it
    shape: tuple[int, int]  # (out, in)
    dtype: str  # stored safetensors dtype
    sha256: str  # of the stored bytes: a build checks it reads this very weight

    def record(self) -> dict:
        return {
            "component": self.component,
            "key": self.key,
            "delta_key": self.delta_key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, eq=False)  # tensors: compare with torch.equal, not ==
class Capture:
    """One forward call's input at a site for one prompt: its valid tokens and their positions."""

    tokens: torch.Tensor  # (n, H) float32
    positions: torch.Tensor  # (n,) int64, index of each token in the (cropped) sequence

    @classmethod
    def of(cls, x: torch.Tensor, mask: torch.Tensor | None) -> Capture:
        """From a captured (tokens, H) input and its validity mask (None: every token is valid)."""
        x = x.to(torch.float32)
        if mask is None:
            return cls(x.contiguous(), torch.arange(x.shape[0], dtype=torch.int64))
        mask = mask.to(torch.bool)
        return cls(x[mask].contiguous(), torch.nonzero(mask).flatten().to(torch.int64))


Prompt = tuple[Capture, ...]  # one prompt: one Capture per forward call


@dataclass(frozen=True, eq=False)
class GroupActivations:
    """The captures of the targets that read one input (one direction per group)."""

    site: str
    input: str  # what the group reads, e.g. "transformer:text_proj" or a hooked module
    targets: tuple[TargetWeight, ...]
    roles: dict[str, tuple[Prompt, ...]]

    @property
    def dim(self) -> int:
        return int(self.targets[0].shape[1])

    def calls(self, role: str) -> list[list[torch.Tensor]]:
        """Per prompt, the token matrices (n, H) of each call: what pooling reads."""
        return [[c.tokens for c in p] for p in self.roles[role]]


@dataclass(frozen=True)
class CaptureRecord:
    """How the activations were captured (also written into every delta built from them)."""

    model: str  # path or hub id as given: where a later build reads the base weights
    revision: str | None
    device: str
    dtype: str
    seed: int
    layer_filter: str | None
    overrides: tuple[str, ...]
    denoise_steps: int | None  # None when no denoise-mode site was captured

    def record(self) -> dict:
        d = dict(self.__dict__)
        d["overrides"] = list(self.overrides)
        return d


@dataclass(frozen=True, eq=False)
class Activations:
    family: str
    defaults: dict  # the family recipe's method defaults: a build fills unset parameters from them
    sites: tuple[str, ...]
    concept: dict  # the concept record, as deltas carry it
    capture: CaptureRecord
    versions: dict
    groups: tuple[GroupActivations, ...]
    path: Path | None = None

    @property
    def concept_name(self) -> str:
        return str(self.concept.get("name", "unnamed"))

    def summary(self) -> dict:
        """A JSON-able overview (for ``--json`` and tables): sizes, not tensors."""
        return {
            "activations": None if self.path is None else str(self.path),
            "family": self.family,
            "concept": self.concept_name,
            "sites": list(self.sites),
            "capture": self.capture.record(),
            "groups": [
                {
                    "site": g.site,
                    "input": g.input,
                    "dim": g.dim,
                    "targets": [t.key for t in g.targets],
                    "prompts": {r: len(ps) for r, ps in g.roles.items()},
                    "tokens": {
                        r: sum(int(c.tokens.shape[0]) for p in ps for c in p)
                        for r, ps in g.roles.items()
                    },
                }
                for g in self.groups
            ],
        }


# --------------------------------------------------------------------------- the file


def _doc(acts: Activations) -> dict:
    return {
        "family": acts.family,
        "defaults": acts.defaults,
        "sites": list(acts.sites),
        "concept": acts.concept,
        "capture": acts.capture.record(),
        "versions": acts.versions,
        "groups": [
            {
                "site": g.site,
                "input": g.input,
                "targets": [t.record() for t in g.targets],
                "roles": [
                    {"role": r, "calls": [[int(c.tokens.shape[0]) for c in p] for p in ps]}
                    | ({"width": _width(g, r)} if _width(g, r) != g.dim else {})
                    for r, ps in g.roles.items()
                ],
            }
            for g in acts.groups
        ],
    }


def _width(g: GroupActivations, role: str) -> int:
    """The row width of a role's tokens: the group's input width unless the role says otherwise."""
    caps = [c for p in g.roles[role] for c in p]
    return int(caps[0].tokens.shape[1]) if caps else g.dim


def _names(i: int, role: str) -> tuple[str, str]:
    return f"{i}.{role}.tokens", f"{i}.{role}.positions"


def _content_hash(doc_json: str, tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256(doc_json.encode())
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _flat(acts: Activations) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, g in enumerate(acts.groups):
        for r, ps in g.roles.items():
            tk, pk = _names(i, r)
            caps = [c for p in ps for c in p]
            out[tk] = (
                torch.cat([c.tokens for c in caps]) if caps else torch.zeros(0, _width(g, r))
            ).to(torch.float32)
            out[pk] = (torch.cat([c.positions for c in caps]) if caps else torch.zeros(0)).to(
                torch.int64
            )
    return out


def write_activations(path: str | os.PathLike, acts: Activations, overwrite: bool = False) -> str:
    """Write atomically (never over an existing file unless ``overwrite``); returns the content hash."""
    from ..output import atomic_file

    doc_json = json.dumps(_doc(acts), sort_keys=True, separators=(",", ":"))
    tensors = _flat(acts)
    digest = _content_hash(doc_json, list(tensors.values()))
    meta = {
        "vpatch.format": FORMAT,
        "vpatch.format_version": str(FORMAT_VERSION),
        "vpatch.activations": doc_json,
        "vpatch.activations_sha256": digest,
    }
    with atomic_file(Path(path), [], overwrite, "activations") as tmp:
        save_tensors(tmp, tensors, meta)
        read_activations(tmp)  # validate what landed before it gets the final name
    return digest


class _Doc:
    """Typed access to the JSON description; every failure names the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str) -> ActivationsError:
        return ActivationsError(f"{self.where}: {msg}")

    def get(self, obj: object, key: str, kind: type | tuple, what: str, optional: bool = False):
        if not isinstance(obj, dict):
            raise self.fail(f"{what} is not an object")
        if key not in obj:
            raise self.fail(f"{what}: field {key!r} is missing")
        val = obj[key]
        if val is None and optional:
            return None
        if not isinstance(val, kind) or (isinstance(val, bool) and kind in (int, (int, float))):
            raise self.fail(f"{what}: field {key!r} has the wrong type")
        return val


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _target(d: _Doc, rec: object, what: str) -> TargetWeight:
    comp = d.get(rec, "component", str, what)
    key = d.get(rec, "key", str, what)
    delta_key = d.get(rec, "delta_key", str, what)
    shape = d.get(rec, "shape", list, what)
    dtype = d.get(rec, "dtype", str, what)
    sha = d.get(rec, "sha256", str, what)
    if not (len(shape) == 2 and all(_count(s) and s > 0 for s in shape)):
        raise d.fail(f"{what}: shape must be [out, in] with positive integers")
    if dtype not in DTYPE_BITS:
        raise d.fail(f"{what}: dtype {dtype!r} is not a safetensors dtype")
    if not _HEX64.match(sha):
        raise d.fail(f"{what}: sha256 must be 64 lowercase hex digits")
    if not delta_key.endswith("/" + key):
        raise d.fail(f"{what}: delta_key {delta_key!r} does not name key {key!r}")
    return TargetWeight(comp, key, delta_key, (shape[0], shape[1]), dtype, sha)


def _capture_record(d: _Doc, rec: object) -> CaptureRecord:
    w = "capture"
    overrides = d.get(rec, "overrides", list, w)
    if not all(isinstance(o, str) for o in overrides):
        raise d.fail("capture: field 'overrides' must list strings")
    steps = d.get(rec, "denoise_steps", int, w, optional=True)
    return CaptureRecord(
        d.get(rec, "model", str, w),
        d.get(rec, "revision", str, w, optional=True),
        d.get(rec, "device", str, w),
        d.get(rec, "dtype", str, w),
        d.get(rec, "seed", int, w),
        d.get(rec, "layer_filter", str, w, optional=True),
        tuple(overrides),
        steps,
    )


def _meta(d: _Doc, meta: dict[str, str]) -> dict:
    if meta.get("vpatch.format") != FORMAT:
        raise d.fail(
            f"a safetensors file but not vpatch activations (no vpatch.format={FORMAT}); "
            "write one with `vpatch probe ... --save-activations FILE`"
        )
    try:
        ver = int(meta.get("vpatch.format_version", ""))
    except ValueError:
        raise d.fail("vpatch.format_version is not an integer") from None
    if not 1 <= ver <= FORMAT_VERSION:
        raise d.fail(
            f"format version {ver} is not supported (reads 1..{FORMAT_VERSION}); upgrade vpatch"
        )
    if "vpatch.activations" not in meta:
        raise d.fail("metadata field 'vpatch.activations' is missing; capture again")
    try:
        doc = json.loads(meta["vpatch.activations"])
    except (ValueError, RecursionError):
        raise d.fail("metadata field 'vpatch.activations' is not valid JSON") from None
    if not isinstance(doc, dict):
        raise d.fail("metadata field 'vpatch.activations' is not a JSON object")
    return doc


def _group(d: _Doc, i: int, g: object) -> tuple[str, str, tuple[TargetWeight, ...], list]:
    """One group's description: (site, input, targets, [(role, token counts per prompt per call)])."""
    w = f"groups[{i}]"
    raw_targets = d.get(g, "targets", list, w)
    if not raw_targets:
        raise d.fail(f"{w}: no targets")
    targets = tuple(_target(d, t, f"{w}.targets[{j}]") for j, t in enumerate(raw_targets))
    if any(t.shape[1] != targets[0].shape[1] for t in targets):
        raise d.fail(f"{w}: targets read inputs of different widths")
    roles: list[tuple[str, list, int]] = []
    for j, r in enumerate(d.get(g, "roles", list, w)):
        rw = f"{w}.roles[{j}]"
        name, calls = d.get(r, "role", str, rw), d.get(r, "calls", list, rw)
        if not _ROLE.match(name) or name in (x[0] for x in roles):
            raise d.fail(f"{rw}: role {name!r} is not a lowercase name or appears twice")
        if not all(isinstance(p, list) and all(_count(n) for n in p) for p in calls):
            raise d.fail(f"{rw}: calls must be lists of token counts per prompt")
        width = r.get("width", targets[0].shape[1]) if isinstance(r, dict) else None
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise d.fail(f"{rw}: width must be a whole number >= 1")
        roles.append((name, calls, width))
    counts = {name: len(calls) for name, calls, _w in roles}
    if not all(r in counts for r in PAIR_ROLES):
        raise d.fail(f"{w}: roles must include {', '.join(PAIR_ROLES)}")
    if len({counts[r] for r in PAIR_ROLES}) != 1:
        raise d.fail(f"{w}: unsafe and safe hold different numbers of prompts")
    return d.get(g, "site", str, w), d.get(g, "input", str, w), targets, roles


def _expected_tensors(specs: list) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor the description implies, in the order they were written (the hash's order)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, (_site, _inp, _targets, roles) in enumerate(specs):
        for name, calls, width in roles:
            n = sum(sum(p) for p in calls)
            tk, pk = _names(i, name)
            out[tk] = ("F32", (n, width))
            out[pk] = ("I64", (n,))
    return out


def _read_tensors(d: _Doc, header, expected: dict) -> dict[str, torch.Tensor]:
    if set(expected) != set(header.tensors):
        missing = sorted(set(expected) - set(header.tensors))[:3]
        extra = sorted(set(header.tensors) - set(expected))[:3]
        raise d.fail(
            f"tensors do not match the description (missing {missing}, unexpected {extra})"
        )
    for name, (dt, shape) in expected.items():
        t = header.tensors[name]
        if t.dtype != dt or t.shape != shape:
            raise d.fail(
                f"tensor {name} is {t.dtype}{list(t.shape)}, the description needs {dt}{list(shape)}"
            )
    with TensorReader(header) as rd:
        flat = {name: rd.tensor(name) for name in expected}
    stored = header.metadata.get("vpatch.activations_sha256")
    digest = _content_hash(header.metadata["vpatch.activations"], list(flat.values()))
    if stored != digest:
        raise d.fail(
            f"the content hash does not match (stored {str(stored)[:16]}..., computed "
            f"{digest[:16]}...); the file was modified or damaged, capture again"
        )
    return flat


def _split(toks: torch.Tensor, pos: torch.Tensor, calls: list[list[int]]) -> tuple[Prompt, ...]:
    """Cut one role's concatenated tokens back into prompts and calls."""
    at, prompts = 0, []
    for p in calls:
        caps = []
        for n in p:
            caps.append(Capture(toks[at : at + n], pos[at : at + n]))
            at += n
        prompts.append(tuple(caps))
    return tuple(prompts)


def read_activations(path: str | os.PathLike) -> Activations:
    """Read and check saved activations; any defect is one ``ActivationsError`` naming it."""
    path = Path(path)
    d = _Doc(str(path))
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise d.fail("activations are safetensors files; vpatch never loads pickle")
    try:
        header = read_header(path)
    except FormatError as e:
        raise ActivationsError(f"not a valid activations file: {e}") from None
    doc = _meta(d, header.metadata)
    top = "activations"
    family = d.get(doc, "family", str, top)
    defaults = d.get(doc, "defaults", dict, top)
    sites = d.get(doc, "sites", list, top)
    if not all(isinstance(x, str) for x in sites):
        raise d.fail("activations: field 'sites' must list strings")
    concept = d.get(doc, "concept", dict, top)
    record = _capture_record(d, d.get(doc, "capture", dict, top))
    versions = d.get(doc, "versions", dict, top)
    raw_groups = d.get(doc, "groups", list, top)
    if not raw_groups:
        raise d.fail("activations: no groups; capture again")
    specs = [_group(d, i, g) for i, g in enumerate(raw_groups)]
    flat = _read_tensors(d, header, _expected_tensors(specs))
    groups = tuple(
        GroupActivations(
            site,
            inp,
            targets,
            {n: _split(*(flat[k] for k in _names(i, n)), c) for n, c, _w in roles},
        )
        for i, (site, inp, targets, roles) in enumerate(specs)
    )
    return Activations(family, defaults, tuple(sites), concept, record, versions, groups, path)
