"""Atomic outputs: write beside the target under a temporary name, validate, then rename.

An interrupted run leaves only a hidden ``.*.vpatch-tmp-*`` entry, never a file that looks finished,
and the input is never the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .safetensors_io import disk_full


def check_target(out: Path, inputs: list[Path], overwrite: bool) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(
            f"output folder {parent} does not exist; create it first (mkdir -p {parent}) or choose another -o"
        )
    for inp in inputs:
        if out.exists() and inp.exists() and os.path.samefile(out, inp):
            raise OutputError(
                f"output {out} is the input; vpatch never overwrites its input, choose another -o"
            )
        try:
            inp.resolve().relative_to(out.resolve())
            raise OutputError(f"output {out} contains the input {inp}; choose another -o")
        except ValueError:
            pass
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; choose another -o or pass --overwrite")


def _replace(tmp: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        old = out.with_name(f".{out.name}.vpatch-old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder of a finished output reaches the disk before the output gets its name."""
    for dp, _dns, fns in os.walk(root):
        for f in fns:
            fd = os.open(Path(dp) / f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dp))


@contextmanager
def _translate_os_errors(out: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if disk_full(e):
            raise OutputError(
                f"no space left on the device while writing {out}; nothing was written, free space or choose -o on another disk"
            ) from None
        if isinstance(e, PermissionError):
            raise OutputError(
                f"permission denied while writing {out}: {e.strerror}; choose a writable -o"
            ) from None
        raise


@contextmanager
def atomic_file(out: Path, inputs: list[Path] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``out``; on success it replaces ``out``, on failure it is removed."""
    check_target(out, list(inputs), overwrite)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".vpatch-tmp", dir=out.parent)
    os.close(fd)
    os.unlink(name)  # writers create it exclusively
    tmp = Path(name)
    try:
        with _translate_os_errors(out):
            yield tmp
            _replace(tmp, out)
            _fsync_dir(out.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(out: Path, inputs: list[Path] = (), overwrite: bool = False) -> Iterator[Path]:
    check_target(out, list(inputs), overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".vpatch-tmp", dir=out.parent))
    try:
        with _translate_os_errors(out):
            yield tmp
            _fsync_tree(tmp)
            _replace(tmp, out)
            _fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
