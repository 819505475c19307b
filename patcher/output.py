"""Atomic outputs: write beside the target under a temporary name, validate, then rename.

An interrupted run leaves only a hidden ``.NAME.TAG.PID.RAND.vpatch-tmp`` entry, never a file that
looks finished; SIGTERM and SIGHUP remove it like Ctrl-C does, and a later run on the same output
removes what a killed run (SIGKILL, power loss) left, once its process is gone. The final rename
never replaces an output that appeared meanwhile (another run): ``renameat2(RENAME_NOREPLACE)``.
``--overwrite`` replaces only what ``replaceable`` accepts; inputs are never the target.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .safetensors_io import disk_full

TMP_SUFFIX = ".vpatch-tmp"
OLD_SUFFIX = ".vpatch-old"
MAX_NAME = 255  # bytes in one path component on every common Linux file system
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".gguf")


class Terminated(BaseException):  # noqa: N818 -- like KeyboardInterrupt, not an error of the user's
    """SIGTERM or SIGHUP arrived while an output was being written; it was cleaned up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# --------------------------------------------------------------------------- what may be replaced


def _safetensors_meta(p: Path) -> dict[str, str] | None:
    from .errors import FormatError, PickleRefused
    from .safetensors_io import read_header

    try:
        return read_header(p).metadata
    except (FormatError, PickleRefused, OSError):
        return None


def _folder_is_output(d: Path) -> bool:
    """A folder vpatch wrote: one of its weight files (top level or one below) carries provenance."""
    for f in [*d.glob("*.safetensors"), *d.glob("*/*.safetensors")]:
        meta = _safetensors_meta(f)
        if meta is not None and "vpatch.applied" in meta:
            return True
    return False


# What ``--overwrite`` may replace, by the kind of output being written: only an earlier vpatch
# output of the same kind, recognised by its header, never by its name.
_OUTPUT_FORMATS = {
    "record": "vud-revert",
    "delta": "vud",
    "activations": "vpatch-activations",
    "lora": "lora",
}
_FORMAT_NAMES = {
    "vud": "a delta (.vud)",
    "vud-revert": "a revert record",
    "vpatch-activations": "saved probe activations",
    "lora": "an exported LoRA",
}


def replaceable(out: Path, kind: str | None) -> str | None:
    """Why ``--overwrite`` must not replace ``out`` (None: it may). ``kind`` is what is being
    written: ``checkpoint`` (apply/revert output), ``converted`` (convert output), ``record``,
    ``delta``, ``activations`` or ``lora``; None allows only a plain file that is no model."""
    if out.is_symlink():
        return "is a symbolic link"
    if out.is_dir():
        if kind != "checkpoint":
            return "is a folder"
        if _folder_is_output(out):
            return None
        return "is a folder that vpatch did not write (none of its weight files carries vpatch provenance)"
    if not out.is_file():
        return "is not a regular file"
    meta = _safetensors_meta(out)
    if meta is not None:
        fmt = meta.get("vpatch.format")
        if fmt is not None and fmt == _OUTPUT_FORMATS.get(kind or ""):
            return None
        if fmt in _FORMAT_NAMES:
            return f"is {_FORMAT_NAMES[fmt]}"
        if kind == "checkpoint" and "vpatch.applied" in meta:
            return None
        if kind == "converted" and "vpatch.converted_from" in meta:
            return None
        return "is a safetensors file that vpatch did not write as this kind of output"
    if out.suffix.lower() in PICKLE_SUFFIXES:
        return "is a model weight file"
    return None  # a plain file that is no model: replaced like cp -f would


def check_name(out: Path) -> None:
    """Every component of the output path fits a file name (255 bytes)."""
    for part in out.parts:
        if len(os.fsencode(part)) > MAX_NAME:
            raise OutputError(
                f"output path component {part[:40]}... is {len(os.fsencode(part))} bytes, over the {MAX_NAME}-byte limit of a file name; choose a shorter -o"
            )


def check_target(
    out: Path,
    inputs: list[Path],
    overwrite: bool,
    kind: str | None = None,
    folder: bool | None = None,
    flag: str = "-o",
    can_overwrite: bool = True,
) -> None:
    """Refuse, before any work, an output that cannot or must not be written.

    ``inputs``: every path the command reads (checkpoint, its files, the delta, a record); the
    output is none of them, contains none of them and is not inside an input folder. With ``kind``,
    an existing output is replaced only if ``replaceable`` accepts it (kind None: only a plain file
    that is no model); ``folder`` says whether the
    output is a folder (an existing output of the other sort is refused). ``flag``: the option the
    user gave the path with, which the messages name; ``can_overwrite``: whether the command offers
    --overwrite."""
    check_name(out)
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(
            f"output folder {parent} does not exist; create it first (mkdir -p {parent}) or choose another {flag}"
        )
    real_out = out.resolve()
    for inp in inputs:
        if os.path.lexists(out) and inp.exists() and os.path.samefile(out, inp):
            raise OutputError(
                f"output {out} is the input {inp}; vpatch never overwrites its input, choose another {flag}"
            )
        real_in = inp.resolve()
        if real_in.is_relative_to(real_out):
            raise OutputError(f"output {out} contains the input {inp}; choose another {flag}")
        if inp.is_dir() and real_out.is_relative_to(real_in):
            raise OutputError(
                f"output {out} is inside the input folder {inp}; vpatch never writes into its input, choose {flag} outside it"
            )
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(parent) else "is not writable"
        raise OutputError(f"output folder {parent} {why}; choose a writable {flag}")
    if not os.path.lexists(out):
        return
    if not overwrite:
        again = " or pass --overwrite" if can_overwrite else ""
        raise OutputError(f"output {out} already exists; choose another {flag}{again}")
    if folder is not None and out.is_dir() != folder and not out.is_symlink():
        want, have = ("a folder", "a file") if folder else ("a file", "a folder")
        raise OutputError(
            f"output {out} is {have}, but this output is {want}; choose another {flag}"
        )
    why = replaceable(out, kind)
    if why is not None:
        raise OutputError(
            f"--overwrite replaces only a previous vpatch output, and {out} {why}; remove it yourself or choose another {flag}"
        )


def _read_only(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --------------------------------------------------------------------------- temporaries


def _tag(out: Path) -> str:
    return hashlib.sha256(os.fsencode(out.name)).hexdigest()[:12]


def _scratch(out: Path, suffix: str) -> Path:
    """A hidden name beside ``out``, short enough whatever the output's name, that says which output
    and which process it belongs to."""
    stem = out.name[:40].replace(".", "_")
    return out.parent / f".{stem}.{_tag(out)}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: Path) -> list[str]:
    """Remove the temporaries that runs on ``out`` left when they were killed; say what was removed."""
    notes = []
    for suffix in (TMP_SUFFIX, OLD_SUFFIX):
        for p in sorted(out.parent.glob(f".*.{_tag(out)}.*{suffix}")):
            parts = p.name[: -len(suffix)].split(".")
            try:
                pid = int(parts[-2])
            except (ValueError, IndexError):
                continue
            if pid == os.getpid() or _alive(pid):
                continue  # a run in progress (or this one): not ours to touch
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError as e:
                notes.append(f"could not remove {p}, left by an interrupted run: {e.strerror}")
                continue
            notes.append(f"removed {p.name}, left in {p.parent} by an interrupted run (pid {pid})")
    return notes


@contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (what timeout, docker and systemd send) raise ``Terminated`` in the main
    thread, so the temporaries are removed as for Ctrl-C; a repeated signal waits for the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- the final rename

_RENAME_NOREPLACE = 1
_libc = None


def _renameat2(src: Path, dst: Path) -> int:
    """0 on success, else the errno (ENOSYS when the call does not exist)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return errno.ENOSYS
    at_fdcwd = -100
    r = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE)
    return 0 if r == 0 else ctypes.get_errno()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing if ``dst`` exists, atomically (no window between the check and the rename)."""
    err = _renameat2(src, dst)
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without it
        if src.is_dir():
            os.mkdir(dst)  # the reservation: EEXIST if another run has the name
            os.rename(src, dst)  # a folder may replace an empty folder
        else:
            os.link(src, dst)  # EEXIST if another run has the name
            os.unlink(src)
        return
    if err == errno.EEXIST:
        raise OutputError(
            f"output {dst} appeared while this run was writing it (another vpatch run?); it was left as it is and nothing was replaced"
        )
    if err:
        raise OSError(err, os.strerror(err), str(dst))


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    if not overwrite or not os.path.lexists(out):
        rename_noreplace(tmp, out)
    elif out.is_dir() and not out.is_symlink():
        old = _scratch(out, OLD_SUFFIX)
        os.rename(out, old)
        try:
            rename_noreplace(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
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


_OS_ERRORS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "a file name is too long",
    errno.EMLINK: "too many links",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "is a folder",
    errno.ELOOP: "too many symbolic links",
}


@contextmanager
def _translate_os_errors(out: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if disk_full(e):
            raise OutputError(
                f"no space left on the device (no free blocks or inodes) while writing {out}; nothing was written, free space or choose -o on another disk"
            ) from None
        if e.errno in _OS_ERRORS:
            where = f" ({e.filename})" if e.filename else ""
            raise OutputError(
                f"cannot write {out}: {_OS_ERRORS[e.errno]}{where}; nothing was written, choose a writable -o"
            ) from None
        raise


@contextmanager
def atomic_file(
    out: Path,
    inputs: list[Path] = (),
    overwrite: bool = False,
    kind: str | None = None,
    notes: list[str] | None = None,
    flag: str = "-o",
    can_overwrite: bool = True,
) -> Iterator[Path]:
    """Yield a temp path next to ``out`` (not yet created); on success it becomes ``out``, on
    failure, Ctrl-C, SIGTERM or SIGHUP it is removed. ``notes`` collects what stale temporaries of
    earlier killed runs were removed."""
    check_target(out, list(inputs), overwrite, kind, False, flag, can_overwrite)
    with _translate_os_errors(out), _cleanup_on_signals():
        found = clear_stale(out)
        if notes is not None:
            notes.extend(found)
        tmp = _scratch(out, TMP_SUFFIX)
        try:
            yield tmp
            _replace(tmp, out, overwrite)
            _fsync_dir(out.parent)
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()


@contextmanager
def atomic_dir(
    out: Path,
    inputs: list[Path] = (),
    overwrite: bool = False,
    kind: str | None = None,
    notes: list[str] | None = None,
    flag: str = "-o",
    can_overwrite: bool = True,
) -> Iterator[Path]:
    """``atomic_file`` for a folder. The folder is created as ``mkdir`` would (mode 0777 less the
    umask), so the output is as readable as a plain copy."""
    check_target(out, list(inputs), overwrite, kind, folder=True)
    with _translate_os_errors(out), _cleanup_on_signals():
        found = clear_stale(out)
        if notes is not None:
            notes.extend(found)
        tmp = _scratch(out, TMP_SUFFIX)
        os.mkdir(tmp)
        try:
            yield tmp
            _fsync_tree(tmp)
            _replace(tmp, out, overwrite)
            _fsync_dir(out.parent)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
