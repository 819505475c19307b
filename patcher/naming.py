"""Where ``apply`` writes when no output is given: next to the input, named after it and the
delta's concept(s), e.g. ``model.no-nudity.safetensors`` or ``wan-no-nudity/``. A hub id is written
into the current folder. The writer still refuses an existing path and never touches the input."""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import hub
from .vud.combine import concept_names, slug
from .vud.delta import Delta, read_delta

SUFFIX = ".safetensors"


TAG_MAX = 96  # bytes: the tag leaves room for the input's own name in a 255-byte file name


def concept_tag(delta: Delta) -> str:
    """``no-nudity``, or ``no-nudity-no-gore`` for a delta that removes several concepts; a tag
    longer than TAG_MAX keeps its start and a hash of the whole (a long concept name, or many
    merged concepts, made a name over the file-system limit)."""
    tag = "-".join(f"no-{slug(n)}" for n in concept_names(delta))
    if len(tag) <= TAG_MAX:
        return tag
    return f"{tag[: TAG_MAX - 13].rstrip('-.')}-{hashlib.sha256(tag.encode()).hexdigest()[:12]}"


def _file_name(name: str, tag: str) -> str:
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else Path(name).stem
    return f"{stem}.{tag}{SUFFIX}"


def _local(path: Path, tag: str) -> Path:
    if path.is_file():
        if path.name.endswith(
            ".index.json"
        ):  # a sharded checkpoint becomes a folder beside its own
            return path.parent.parent / f"{path.parent.name}-{tag}"
        return path.with_name(_file_name(path.name, tag))
    path = path.resolve() if path.name in ("", ".", "..") else path
    return path.with_name(f"{path.name}-{tag}")


def derived_output(
    checkpoint: str | Path, delta: str | Path | Delta, cwd: str | Path | None = None
) -> Path:
    """The output ``apply`` writes when it is given none (see the module docstring)."""
    dl = delta if isinstance(delta, Delta) else read_delta(delta)
    tag = concept_tag(dl)
    path = Path(checkpoint)
    if path.exists():
        return _local(path, tag)
    here = Path.cwd() if cwd is None else Path(cwd)
    parsed = hub.parse(str(checkpoint))
    if parsed is None:
        return _local(path, tag)  # not there: the checkpoint's own error comes first
    repo, inner = parsed
    name = repo.split("/", 1)[1]
    if inner and inner.endswith(SUFFIX):
        return here / _file_name(inner.rsplit("/", 1)[-1], tag)
    if inner and not inner.endswith(".index.json"):
        return here / f"{name}-{inner.rstrip('/').rsplit('/', 1)[-1]}-{tag}"
    return here / f"{name}-{tag}"
