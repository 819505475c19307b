"""``vpatch convert``: turn a pickle checkpoint (.bin/.pt/.ckpt) into safetensors, once, on purpose.

vpatch never unpickles silently. With an explicit ``--trust-pickle`` the file is loaded with
``torch.load(weights_only=True)``, which refuses arbitrary Python objects (no code runs from the file);
tensors are written in their own dtype, non-tensor entries are listed and left out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .errors import FormatError, PickleRefused
from .output import atomic_file
from .safetensors_io import DTYPE_NAMES, read_header, save_tensors

WRAPPERS = ("state_dict", "model", "module", "model_state_dict", "ema")


def _flatten(
    obj: object, prefix: str, out: dict[str, torch.Tensor], skipped: list[str], src: Path
) -> None:
    if isinstance(obj, torch.Tensor):
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(
                f"{src}: key {prefix!r} is not valid Unicode text (a lone surrogate); safetensors names are UTF-8, rename it"
            ) from None
        if prefix == "__metadata__":
            raise FormatError(
                f"{src}: a tensor is named '__metadata__', which safetensors reserves; rename it"
            )
        if prefix in out:
            raise FormatError(
                f"{src}: two entries flatten to the same key {prefix!r} (a dotted name and a nested dict, "
                "or keys that differ only in type); rename one and convert again"
            )
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, skipped, src)
    else:
        skipped.append(prefix or "<root>")


def convert_pickle(
    src: str | Path, out: str | Path, *, trust_pickle: bool = False, overwrite: bool = False
) -> dict:
    src, out = Path(src), Path(out)
    if not trust_pickle:
        raise PickleRefused(
            f"{src}: converting means unpickling it. Pass --trust-pickle only for a file from a source you trust; "
            "vpatch then loads it with torch.load(weights_only=True), which refuses arbitrary Python objects"
        )
    if not src.is_file():
        raise FormatError(f"{src}: no such file")
    if out.suffix != ".safetensors":
        raise FormatError(f"-o {out}: the output must be a .safetensors file")
    if src.stat().st_size == 0:
        raise FormatError(f"{src}: the file is empty; nothing to convert")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file can make the unpickler fail in any way
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise FormatError(
            f"{src}: refused by torch.load(weights_only=True): {first} "
            "(it holds objects other than tensors and plain containers, or is damaged)"
        ) from None
    if isinstance(obj, dict):
        for w in WRAPPERS:  # training checkpoints wrap the weights
            if isinstance(obj.get(w), dict) and any(
                isinstance(v, torch.Tensor) for v in obj[w].values()
            ):
                obj = obj[w]
                break
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    _flatten(obj, "", tensors, skipped, src)
    if not tensors:
        raise FormatError(f"{src}: no tensors found (top-level entries: {', '.join(skipped[:5])})")
    for k, t in tensors.items():
        if t.layout != torch.strided:
            raise FormatError(
                f"{src}: tensor {k!r} is {t.layout} (not dense); convert it to a dense tensor first"
            )
    bad = {k: str(t.dtype) for k, t in tensors.items() if t.dtype not in DTYPE_NAMES}
    if bad:
        k0 = next(iter(bad))
        raise FormatError(
            f"{src}: tensors of dtype {', '.join(sorted(set(bad.values())))} (first: {k0!r}) are not converted: "
            f"vpatch writes only {', '.join(DTYPE_NAMES.values())}; safetensors can store more dtypes, "
            "but vpatch does not map them. Cast them (e.g. to float32) and convert again"
        )
    # safetensors stores each tensor's own bytes: views and shared storage become plain copies
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    meta = {
        "format": "pt",
        # a file name that is not UTF-8 is kept with its raw bytes escaped (metadata is UTF-8 text)
        "vpatch.converted_from": os.fsencode(src.name).decode("utf-8", "backslashreplace"),
        "vpatch.source_sha256": digest.hexdigest(),
    }
    with atomic_file(out, [src], overwrite, "converted") as tmp:
        save_tensors(tmp, tensors, meta)
        if set(read_header(tmp).tensors) != set(tensors):
            raise FormatError(f"validation of {out} failed; nothing was kept")
    return {
        "output": str(out),
        "tensors": len(tensors),
        "skipped": skipped,
        "bytes": out.stat().st_size,
        "source_sha256": meta["vpatch.source_sha256"],
    }
