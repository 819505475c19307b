"""The ``.vud`` delta file: a safetensors file of fp32 low-rank factors plus a JSON layer map.

The spec is ``docs/vud-format.md``; this module is its only reader and writer. Reading validates
everything (header, map, shapes, orthonormality, hash) and fails with a ``DeltaError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..erasure.refusal import is_orthonormal, projection_factors
from ..errors import DeltaError, FormatError, IntegrityError
from ..safetensors_io import DTYPE_BITS, TensorReader, read_header, save_tensors

FORMAT = "vud"
FORMAT_VERSION = 2  # 2: the hash covers concept and method records; the map_input kind (P factor)
KINDS = ("add", "project_input", "map_input")
MAX_KEY_LEN = 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class DeltaEntry:
    """One edited weight: W' = W + strength_scale * U Vᵀ (``add``) or the projection (``project_input``)."""

    key: str  # "component/state.dict.key"
    shape: tuple[int, int]  # (out, in) of the target weight
    kind: str
    strength: float  # the λ the factors were computed with (``add``: already folded into U)
    U: torch.Tensor  # (out, r) fp32
    V: torch.Tensor  # (in, r) fp32; for project_input this is B, orthonormal
    base_sha256: str | None = None  # sha256 of the base tensor's stored bytes
    base_dtype: str | None = None
    P: torch.Tensor | None = None  # map_input only: (in, r), W' = W + λ (W P) Vᵀ

    @property
    def component(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def tensor_key(self) -> str:
        return self.key.split("/", 1)[1]

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def map_record(self) -> dict:
        return {
            "key": self.key,
            "shape": list(self.shape),
            "kind": self.kind,
            "strength": self.strength,
            "rank": self.rank,
            "base_sha256": self.base_sha256,
            "base_dtype": self.base_dtype,
        }


@dataclass
class Delta:
    entries: list[DeltaEntry]
    concept: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    path: Path | None = None
    format_version: int = FORMAT_VERSION  # a delta read from an older file keeps that file's hash

    @property
    def sha256(self) -> str:
        return delta_hash(self.entries, self.concept, self.method, self.format_version)

    @property
    def concept_name(self) -> str:
        return str(self.concept.get("name", "unnamed"))

    def components(self) -> list[str]:
        return sorted({e.component for e in self.entries})


def _factor_names(key: str) -> tuple[str, str]:
    return f"{key}::U", f"{key}::V"


def _p_name(key: str) -> str:
    return f"{key}::P"


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def delta_hash(
    entries: list[DeltaEntry],
    concept: dict | None = None,
    method: dict | None = None,
    version: int = FORMAT_VERSION,
) -> str:
    """sha256 over the canonical layer map, (version 2 on) the canonical concept and method
    records, then every factor's bytes in map order (U, V, then P where
    the entry has one). Version 1 files keep their hash."""
    h = hashlib.sha256()
    h.update(_canonical([e.map_record() for e in entries]))
    if version >= 2:
        h.update(_canonical({"concept": concept or {}, "method": method or {}}))
    for e in entries:
        for t in (e.U, e.V) if e.P is None else (e.U, e.V, e.P):
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    out = {
        "vpatch": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }
    for mod in ("diffusers", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def write_delta(path: str | os.PathLike, delta: Delta, overwrite: bool = False) -> str:
    """Validate, then write atomically; returns the delta hash."""
    from ..output import atomic_file

    _check_entries(delta.entries, str(path))
    tensors: dict[str, torch.Tensor] = {}
    for e in delta.entries:
        u, v = _factor_names(e.key)
        tensors[u] = e.U.detach().to(torch.float32).contiguous()
        tensors[v] = e.V.detach().to(torch.float32).contiguous()
        if e.P is not None:
            tensors[_p_name(e.key)] = e.P.detach().to(torch.float32).contiguous()
    digest = delta_hash(delta.entries, delta.concept, delta.method)
    meta = {
        "vpatch.format": FORMAT,
        "vpatch.format_version": str(FORMAT_VERSION),
        "vpatch.layer_map": json.dumps([e.map_record() for e in delta.entries]),
        "vpatch.method": json.dumps(delta.method),
        "vpatch.concept": json.dumps(delta.concept),
        "vpatch.versions": json.dumps(delta.versions or versions()),
        "vpatch.delta_sha256": digest,
    }
    with atomic_file(Path(path), [], overwrite, "delta") as tmp:
        save_tensors(tmp, tensors, meta)
        read_delta(tmp)  # validate what landed before it gets the final name
    return digest


def _json_field(meta: dict[str, str], key: str, where: str, kind: type) -> object:
    if key not in meta:
        raise DeltaError(
            f"{where}: metadata field {key!r} is missing; the delta is incomplete, re-run `vpatch probe`"
        )
    try:
        val = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise DeltaError(f"{where}: metadata field {key!r} is not valid JSON") from None
    if not isinstance(val, kind):
        raise DeltaError(f"{where}: metadata field {key!r} must be a JSON {kind.__name__}")
    try:  # "\ud800" is valid JSON but no UTF-8 text: it would break every later write
        json.dumps(val, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DeltaError(
            f"{where}: metadata field {key!r} holds a lone surrogate (not valid Unicode text)"
        ) from None
    return val


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # a JSON integer beyond float range
        return False


def _parse_entry(rec: object, i: int, where: str) -> dict:
    w = f"{where}: layer_map[{i}]"
    if not isinstance(rec, dict):
        raise DeltaError(f"{w} is not an object")
    key = rec.get("key")
    if not isinstance(key, str) or len(key) > MAX_KEY_LEN or not _KEY_RE.match(key):
        raise DeltaError(
            f"{w}: key {key!r} must look like 'component/state.dict.key' (e.g. transformer/blocks.0.attn2.to_k.weight)"
        )
    shape = rec.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise DeltaError(f"{w} ({key}): shape must be [out, in] with positive integers")
    kind = rec.get("kind")
    if kind not in KINDS:
        raise DeltaError(f"{w} ({key}): kind {kind!r} is not one of {', '.join(KINDS)}")
    strength = rec.get("strength")
    if (
        not isinstance(strength, (int, float))
        or isinstance(strength, bool)
        or not _finite(strength)
    ):
        raise DeltaError(f"{w} ({key}): strength must be a finite number")
    rank = rec.get("rank")
    # input-side kinds hold orthonormal input directions V (in, r): up to `in` of them, even when the
    # weight has fewer rows (a map of the input space is not a rank of W)
    top = min(shape) if kind == "add" else shape[1]
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= top:
        raise DeltaError(f"{w} ({key}): rank must be an integer in [1, {top}] for kind {kind}")
    sha = rec.get("base_sha256")
    if sha is not None and (not isinstance(sha, str) or not _HEX64.match(sha)):
        raise DeltaError(f"{w} ({key}): base_sha256 must be 64 lowercase hex digits or null")
    bdt = rec.get("base_dtype")
    if bdt is not None and (not isinstance(bdt, str) or bdt not in DTYPE_BITS):
        raise DeltaError(f"{w} ({key}): base_dtype {bdt!r} is not a safetensors dtype")
    return {
        "key": key,
        "shape": (shape[0], shape[1]),
        "kind": kind,
        "strength": float(strength),
        "rank": rank,
        "base_sha256": sha,
        "base_dtype": bdt,
    }


def _check_entries(entries: list[DeltaEntry], where: str) -> None:
    if not entries:
        raise DeltaError(f"{where}: the delta has no entries")
    seen: set[str] = set()
    for e in entries:
        _parse_entry(e.map_record(), len(seen), where)
        if e.key in seen:
            raise DeltaError(f"{where}: key {e.key} appears twice in the layer map")
        seen.add(e.key)
        out, inn = e.shape
        if tuple(e.U.shape) != (out, e.rank) or tuple(e.V.shape) != (inn, e.rank):
            raise DeltaError(
                f"{where}: {e.key}: factors U{list(e.U.shape)} V{list(e.V.shape)} do not match shape [{out}, {inn}] at rank {e.rank}"
            )
        if not (torch.isfinite(e.U).all() and torch.isfinite(e.V).all()):
            raise DeltaError(f"{where}: {e.key}: factors contain NaN or Inf")
        if e.kind in ("project_input", "map_input") and not is_orthonormal(e.V):
            raise DeltaError(f"{where}: {e.key}: {e.kind} needs orthonormal directions V")
        if (e.kind == "map_input") != (e.P is not None):
            raise DeltaError(f"{where}: {e.key}: a P factor belongs to map_input entries only")
        if e.P is not None:
            if tuple(e.P.shape) != (inn, e.rank):
                raise DeltaError(
                    f"{where}: {e.key}: factor P{list(e.P.shape)} does not match [{inn}, {e.rank}]"
                )
            if not torch.isfinite(e.P).all():
                raise DeltaError(f"{where}: {e.key}: factors contain NaN or Inf")


def read_delta(path: str | os.PathLike) -> Delta:
    path = Path(path)
    where = str(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise DeltaError(f"{where}: deltas are .vud (safetensors) files; vpatch never loads pickle")
    try:
        header = read_header(path)
    except FormatError as e:
        raise DeltaError(f"not a valid .vud delta: {e}") from None
    meta = header.metadata
    if meta.get("vpatch.format") != FORMAT:
        raise DeltaError(
            f"{where}: a safetensors file but not a vpatch delta (no vpatch.format=vud); did you swap CHECKPOINT and DELTA?"
        )
    try:
        ver = int(meta.get("vpatch.format_version", ""))
    except ValueError:
        raise DeltaError(f"{where}: vpatch.format_version is not an integer") from None
    if ver > FORMAT_VERSION or ver < 1:
        raise DeltaError(
            f"{where}: format version {ver} is not supported by vpatch {__version__} (reads 1..{FORMAT_VERSION}); upgrade vpatch"
        )
    layer_map = _json_field(meta, "vpatch.layer_map", where, list)
    method = _json_field(meta, "vpatch.method", where, dict)
    concept = _json_field(meta, "vpatch.concept", where, dict)
    vers = _json_field(meta, "vpatch.versions", where, dict)
    recs = [_parse_entry(r, i, where) for i, r in enumerate(layer_map)]

    expected: dict[str, tuple[int, int]] = {}
    for r in recs:
        u, v = _factor_names(r["key"])
        if u in expected:
            raise DeltaError(f"{where}: key {r['key']} appears twice in the layer map")
        expected[u] = (r["shape"][0], r["rank"])
        expected[v] = (r["shape"][1], r["rank"])
        if r["kind"] == "map_input":
            if ver < 2:
                raise DeltaError(f"{where}: {r['key']}: kind map_input needs format version 2")
            expected[_p_name(r["key"])] = (r["shape"][1], r["rank"])
    if set(expected) != set(header.tensors):
        extra = sorted(set(header.tensors) - set(expected))[:3]
        missing = sorted(set(expected) - set(header.tensors))[:3]
        raise DeltaError(
            f"{where}: factor tensors do not match the layer map (missing {missing}, unexpected {extra})"
        )
    for name, shp in expected.items():
        t = header.tensors[name]
        if t.dtype != "F32" or t.shape != shp:
            raise DeltaError(
                f"{where}: factor {name} is {t.dtype}{list(t.shape)}, the layer map needs F32{list(shp)}"
            )

    entries = []
    with TensorReader(header) as rd:
        for r in recs:
            u, v = _factor_names(r["key"])
            entries.append(
                DeltaEntry(
                    r["key"],
                    r["shape"],
                    r["kind"],
                    r["strength"],
                    rd.tensor(u),
                    rd.tensor(v),
                    r["base_sha256"],
                    r["base_dtype"],
                    rd.tensor(_p_name(r["key"])) if r["kind"] == "map_input" else None,
                )
            )
    _check_entries(entries, where)
    digest = delta_hash(entries, concept, method, ver)
    if meta.get("vpatch.delta_sha256") != digest:
        raise IntegrityError(
            f"{where}: the delta's hash does not match its contents (stored {meta.get('vpatch.delta_sha256')!r:.20}..., computed {digest[:16]}...); the file was modified or damaged, re-download or re-probe it"
        )
    return Delta(entries, concept, method, vers, path, ver)


def projection_entry(
    key: str,
    W: torch.Tensor,
    B: torch.Tensor,
    strength: float,
    base_sha256: str | None = None,
    base_dtype: str | None = None,
) -> DeltaEntry:
    """The paper's edit W' = W - λ (W B) Bᵀ as a delta entry computed from the base weight W."""
    U, V = projection_factors(W, B, strength)
    return DeltaEntry(
        key,
        (int(W.shape[0]), int(W.shape[1])),
        "project_input",
        float(strength),
        U,
        V,
        base_sha256,
        base_dtype,
    )


def map_input_entry(
    key: str,
    W: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    strength: float,
    base_sha256: str | None = None,
    base_dtype: str | None = None,
) -> DeltaEntry:
    """An input-side operator W' = W (I + λ P Qᵀ) as a delta entry: U = λ W_base P is stored for
    factor-mode merges, P so that a merge can recompute U from another checkpoint's own W."""
    U = float(strength) * (W.to(torch.float32) @ P.to(torch.float32))
    return DeltaEntry(
        key,
        (int(W.shape[0]), int(W.shape[1])),
        "map_input",
        float(strength),
        U,
        Q.to(torch.float32).clone(),
        base_sha256,
        base_dtype,
        P.to(torch.float32).clone(),
    )
