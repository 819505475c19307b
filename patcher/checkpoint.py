"""Checkpoint layouts: which safetensors files hold which keys, and what else is along for the ride.

Four layouts are understood, all without loading a tensor:
- ``file``: one ``.safetensors`` file;
- ``sharded``: a ``*.safetensors.index.json`` and its shards;
- ``component``: a folder holding one component's weights (single or sharded, any variants) and sidecars;
- ``pipeline``: a diffusers folder with ``model_index.json`` and one subfolder per component.
"""

from __future__ import annotations

import json
import os
import re
import stat
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
    files: list[Path] = field(default_factory=list)  # folder layouts: every file to copy

    @property
    def weight_sets(self) -> list[WeightSet]:
        return [ws for c in self.components for ws in c.weight_sets]

    def applied(self) -> list[dict]:
        """The vpatch provenance records of every weight set, one per delta (``merge.provenance``)."""
        from .merge import provenance

        return [r.to_dict() for r in provenance.applied(self)]

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for ws in self.weight_sets for f in ws.files)


def _variant(name: str) -> str | None:
    m = _VARIANT_RE.match(name)
    v = m.group("variant") if m else None
    # shard names "…-00001-of-00002.safetensors" carry no variant
    return None if v is None or re.fullmatch(r"\d{5}-of-\d{5}", v) else v


def _readable(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror}); nothing was written") from None
    os.close(fd)


def load_single(path: Path) -> WeightSet:
    _readable(path)
    try:
        h = read_header(path)
    except PickleRefused as e:  # a checkpoint can be converted; say how
        raise PickleRefused(f"{e} {CONVERT_HINT}") from None
    return WeightSet([path], None, _variant(path.name), {path: h}, {k: path for k in h.tensors})


def load_index(index: Path) -> WeightSet:
    where = str(index)
    _readable(index)
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise FormatError(f"{where}: index file is larger than {MAX_INDEX_BYTES} bytes")
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
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


def link_roots(root: Path) -> list[Path]:
    """Where symbolic links inside the input ``root`` may point: into the input itself, and for a
    hub-cache snapshot into its repo's cache folder (snapshot files are links to ``../../blobs``)."""
    real = root.resolve()
    roots = [real if real.is_dir() else real.parent]
    for p in (root.absolute(), *root.absolute().parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith(
            ("models--", "datasets--", "spaces--")
        ):
            roots.append(p.parent.parent.resolve())
            break
    return roots


def check_link(p: Path, root: Path, roots: list[Path]) -> None:
    """A symbolic link inside the input is followed only when it resolves inside it."""
    if not p.is_symlink():
        return
    real = Path(os.path.realpath(p))
    if not any(real.is_relative_to(r) for r in roots):
        raise FormatError(
            f"{p} is a symbolic link to {real}, outside the input {root}; vpatch follows links only within the input. Copy the target in, or point vpatch at the folder it lies in"
        )


def _is_scratch(name: str) -> bool:
    return ".vpatch-tmp" in name or ".vpatch-old" in name


def input_files(root: Path) -> list[Path]:
    """Every file of a folder input, by the names it has in the input, following symbolic links
    that stay within it (``link_roots``). Links out of it, link loops, special files (FIFOs,
    sockets, devices) and unreadable entries are refused before any work; leftovers of vpatch's
    own interrupted runs are skipped."""
    roots = link_roots(root)
    files: list[Path] = []

    def visit(d: Path, stack: tuple[Path, ...]) -> None:
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            raise FormatError(f"{d}: folder cannot be read ({e.strerror})") from None
        for name in names:
            if _is_scratch(name):
                continue
            p = d / name
            check_link(p, root, roots)
            try:
                st = p.stat()
            except OSError as e:
                raise FormatError(f"{p}: cannot be read ({e.strerror}; a dangling link?)") from None
            if stat.S_ISDIR(st.st_mode):
                real = p.resolve()
                if real in stack:
                    raise FormatError(
                        f"{p} is a symbolic link to {real}, a folder that contains it"
                    )
                visit(p, (*stack, real))
            elif stat.S_ISREG(st.st_mode):
                _readable(p)
                files.append(p)
            else:
                raise FormatError(
                    f"{p} is not a regular file or folder (a FIFO, socket or device); vpatch copies only files"
                )

    visit(root, (root.resolve(),))
    return files


def scan_folder(folder: Path) -> tuple[list[WeightSet], list[Path]]:
    """A component folder's weight sets (each index with its shards, each other file alone) and pickles."""
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
            ws = load_index(path)
            roots = link_roots(path.parent)
            for f in ws.files:
                check_link(f, path.parent, roots)
            return Checkpoint("sharded", path, [Component(None, path.parent, [ws])])
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

    if not path.is_dir():
        raise FormatError(
            f"{path} is not a regular file or folder (a FIFO, socket or device); give a .safetensors file or a folder"
        )
    files = input_files(path)
    if (path / "model_index.json").is_file():
        comps = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sets, pickles = scan_folder(sub)
            if sets or pickles:
                comps.append(Component(sub.name, sub, sets, pickles))
        return Checkpoint("pipeline", path, comps, files)

    sets, pickles = scan_folder(path)
    if not sets:
        if pickles:
            refuse_pickle(pickles[0])
        gguf = sorted(p for p in path.iterdir() if p.suffix.lower() in QUANT_SUFFIXES)
        if gguf:
            refuse_quantized(gguf[0])
        raise FormatError(
            f"{path}: folder holds no .safetensors weights and no model_index.json; point at a checkpoint file or a diffusers folder"
        )
    return Checkpoint("component", path, [Component(None, path, sets, pickles)], files)
