"""Checkpoint layouts: which safetensors files hold which keys, and what else is along for the ride.

Four layouts are understood, all without loading a tensor:
- ``file``: one ``.safetensors`` file;
- ``sharded``: a ``*.safetensors.index.json`` and its shards;
- ``component``: a folder holding one component's weights (single or sharded, any variants) and sidecars;
- ``pipeline``: a diffusers folder with ``model_index.json`` and one subfolder per component.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import hub
from .dtypes import QUANT_HINT
from .errors import FormatError, PickleRefused
from .safetensors_io import Header, read_header

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_VARIANT_RE = re.compile(
    r"^(?P<stem>.+?)(?:\.(?P<variant>[A-Za-z0-9_-]+))?\.safetensors(?:\.index\.json)?$"
)
MAX_INDEX_BYTES = 64 << 20

CONVERT_HINT = (
    "vpatch never unpickles checkpoints silently (loading pickle can run code). Convert it once, if you trust its source: "
    "vpatch convert IN -o OUT.safetensors --trust-pickle (it loads with torch.load(weights_only=True))"
)


QUANT_SUFFIXES = (".gguf",)


def refuse_pickle(path: Path) -> None:
    raise PickleRefused(f"{path} is a pickle checkpoint. {CONVERT_HINT}")


def refuse_quantized(path: Path) -> None:
    raise FormatError(
        f"{path} is a GGUF file (llama.cpp / ComfyUI-GGUF quantization), which vpatch does not edit. {QUANT_HINT}"
    )


@dataclass
class WeightSet:
    """One complete set of weights: a single file, or the shards an index names."""

    files: list[Path]
    index: Path | None = None
    variant: str | None = None
    headers: dict[Path, Header] = field(default_factory=dict)
    key_file: dict[str, Path] = field(default_factory=dict)
    index_json: dict | None = None

    @property
    def label(self) -> str:
        return str(self.index or self.files[0])

    def shape(self, key: str) -> tuple[int, ...] | None:
        f = self.key_file.get(key)
        return None if f is None else self.headers[f].tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.headers[self.key_file[key]].tensors[key].dtype

    def metadata_records(self) -> list[dict]:
        """vpatch provenance found in this set's headers (one list per edited file, merged)."""
        seen: dict[str, dict] = {}
        for h in self.headers.values():
            for rec in provenance(h.metadata):
                seen.setdefault(json.dumps(rec, sort_keys=True), rec)
        return list(seen.values())


def provenance(meta: dict[str, str]) -> list[dict]:
    raw = meta.get("vpatch.applied")
    if not raw:
        return []
    try:
        val = json.loads(raw)
    except (ValueError, RecursionError):  # "[[[[…" nested past the parser's depth
        return []
    return [r for r in val if isinstance(r, dict)] if isinstance(val, list) else []


@dataclass
class Component:
    name: str | None  # pipeline subfolder, or None when the user gave a bare component
    folder: Path | None
    weight_sets: list[WeightSet]
    pickle_files: list[Path] = field(default_factory=list)


@dataclass
class Checkpoint:
    layout: str  # file | sharded | component | pipeline
    root: Path
    components: list[Component]

    @property
    def weight_sets(self) -> list[WeightSet]:
        return [ws for c in self.components for ws in c.weight_sets]

    def applied(self) -> list[dict]:
        """The vpatch provenance records of every weight set, one per delta."""
        seen: dict[str, dict] = {}
        for ws in self.weight_sets:
            for rec in ws.metadata_records():
                seen.setdefault(str(rec.get("delta_sha256", "?")), rec)
        return list(seen.values())

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for ws in self.weight_sets for f in ws.files)


def _variant(name: str) -> str | None:
    m = _VARIANT_RE.match(name)
    v = m.group("variant") if m else None
    # shard names "…-00001-of-00002.safetensors" carry no variant
    return None if v is None or re.fullmatch(r"\d{5}-of-\d{5}", v) else v


def load_single(path: Path) -> WeightSet:
    h = read_header(path)
    return WeightSet([path], None, _variant(path.name), {path: h}, {k: path for k in h.tensors})


def load_index(index: Path) -> WeightSet:
    where = str(index)
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise FormatError(f"{where}: index file is larger than {MAX_INDEX_BYTES} bytes")
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{where}: not valid JSON; the index is damaged") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise FormatError(f"{where}: index has no weight_map of key -> file name")
    files: list[Path] = []
    for fname in dict.fromkeys(wm.values()):
        p = index.parent / fname
        if Path(fname).name != fname:
            raise FormatError(f"{where}: shard name {fname!r} is not a plain file name")
        if not p.is_file():
            raise FormatError(
                f"{where}: shard {fname} listed in the index is missing; re-download the checkpoint"
            )
        files.append(p)
    headers = {p: read_header(p) for p in files}
    for key, fname in wm.items():
        if key not in headers[index.parent / fname].tensors:
            raise FormatError(
                f"{where}: index says {key} is in {fname}, but that shard does not hold it"
            )
    key_file = {k: index.parent / v for k, v in wm.items()}
    return WeightSet(files, index, _variant(index.name), headers, key_file, obj)


def _scan_folder(folder: Path) -> tuple[list[WeightSet], list[Path]]:
    sets: list[WeightSet] = []
    in_index: set[Path] = set()
    for idx in sorted(folder.glob("*.safetensors.index.json")):
        ws = load_index(idx)
        sets.append(ws)
        in_index.update(ws.files)
    for f in sorted(folder.glob("*.safetensors")):
        if f not in in_index:
            sets.append(load_single(f))
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    return sets, pickles


def open_checkpoint(path: str | Path, revision: str | None = None) -> Checkpoint:
    """Open a local checkpoint; a hub id (``owner/name[:path]``) that is not a local path is fetched
    through the hub cache first (safetensors weights and sidecars only)."""
    path = Path(path)
    if not path.exists():
        if hub.parse(str(path)) is None:
            raise FormatError(f"{path}: no such file or folder")
        path = hub.fetch(str(path), revision)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix.lower() in QUANT_SUFFIXES:
            refuse_quantized(path)
        if path.name.endswith(".index.json"):
            return Checkpoint("sharded", path, [Component(None, path.parent, [load_index(path)])])
        try:
            ws = load_single(path)
        except FormatError as e:
            hint = (
                ""
                if path.suffix == ".safetensors"
                else " (expected a .safetensors file, an index .json, or a folder)"
            )
            raise FormatError(f"{e}{hint}") from None
        return Checkpoint("file", path, [Component(None, None, [ws])])

    if (path / "model_index.json").is_file():
        comps = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sets, pickles = _scan_folder(sub)
            if sets or pickles:
                comps.append(Component(sub.name, sub, sets, pickles))
        return Checkpoint("pipeline", path, comps)

    sets, pickles = _scan_folder(path)
    if not sets:
        if pickles:
            refuse_pickle(pickles[0])
        gguf = sorted(p for p in path.iterdir() if p.suffix.lower() in QUANT_SUFFIXES)
        if gguf:
            refuse_quantized(gguf[0])
        raise FormatError(
            f"{path}: folder holds no .safetensors weights and no model_index.json; point at a checkpoint file or a diffusers folder"
        )
    return Checkpoint("component", path, [Component(None, path, sets, pickles)])
