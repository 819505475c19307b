"""``vpatch convert``: turn a pickle checkpoint (.bin/.pt/.ckpt) into safetensors, once, on purpose.

vpatch never unpickles silently. With an explicit ``--trust-pickle`` the file is loaded with
``torch.load(weights_only=True)``, which refuses arbitrary Python objects (no code runs from the file);
tensors are written in their own dtype, non-tensor entries are listed and left out.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from .errors import FormatError, PickleRefused
from .output import atomic_file
from .safetensors_io import DTYPE_NAMES, read_header, save_tensors

WRAPPERS = ("state_dict", "model", "module", "model_state_dict", "ema")


def _flatten(obj: object, prefix: str, out: dict[str, torch.Tensor], skipped: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, skipped)
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
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise FormatError(
            f"{src}: refused by torch.load(weights_only=True): {str(e).splitlines()[0][:200]} "
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
    _flatten(obj, "", tensors, skipped)
    if not tensors:
        raise FormatError(f"{src}: no tensors found (top-level entries: {', '.join(skipped[:5])})")
    bad = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in DTYPE_NAMES})
    if bad:
        raise FormatError(f"{src}: dtypes {', '.join(bad)} have no safetensors equivalent")
    # safetensors stores each tensor's own bytes: views and shared storage become plain copies
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    meta = {
        "format": "pt",
        "vpatch.converted_from": src.name,
        "vpatch.source_sha256": digest.hexdigest(),
    }
    with atomic_file(out, [src], overwrite) as tmp:
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
