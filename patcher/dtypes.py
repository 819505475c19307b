"""Which stored dtypes ``apply`` edits, and how fp8 weights are decoded and re-encoded.

F32/F16/BF16 are edited in fp32 and cast back. F8_E4M3/F8_E5M2 (ComfyUI ``fp8_e4m3fn`` and
``fp8_scaled`` files, compressed-tensors/ModelOpt exports) are dequantized with their per-tensor or
per-row scale, edited in fp32 and requantized with the *same* scale, so the scale tensor and the
file's convention stay as they were. Everything else a delta targets is refused with a message
naming what is supported; untouched tensors of any dtype are copied as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import DtypeError
from .safetensors_io import TORCH_DTYPES, TensorReader

if TYPE_CHECKING:
    from .checkpoint import WeightSet

FLOAT_DTYPES = ("F32", "F16", "BF16")
FP8: dict[str, torch.dtype] = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
EDITABLE = FLOAT_DTYPES + tuple(FP8)
SUPPORTED = "F32, F16, BF16, and F8_E4M3/F8_E5M2 with or without a per-tensor or per-row scale"
QUANT_HINT = f"vpatch edits {SUPPORTED}; apply the delta to the unquantized checkpoint and quantize the result again"

# per-tensor scale tensors beside an fp8 weight "X.weight": dequantized W = stored * scale
SCALE_NAMES = (
    ("{base}scale_weight", "ComfyUI fp8_scaled"),
    ("{key}_scale", "compressed-tensors / ModelOpt"),
)
BLOCK_SCALE_NAMES = ("{key}_scale_inv",)  # block-wise (128x128) scales: not supported
# bitsandbytes: 4-bit keeps its quant state beside "X.weight" ("X.weight.absmax", ...); 8-bit keeps "X.SCB"
BNB_MARKERS = (
    ".absmax",
    ".quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
    ".SCB",
)


def _names(key: str, patterns: tuple) -> list[str]:
    base = key[: -len("weight")] if key.endswith("weight") else key + "."
    return [p.format(base=base, key=key) for p in patterns]


def _scales(ws: WeightSet, key: str) -> list[tuple[str, str]]:
    """(scale tensor, convention) present beside ``key``."""
    return [
        (n, conv)
        for n, (_, conv) in zip(_names(key, tuple(p for p, _ in SCALE_NAMES)), SCALE_NAMES)
        if ws.shape(n) is not None
    ]


def dtype_refusal(ws: WeightSet, key: str) -> str | None:
    """Why a targeted tensor cannot be edited, or None when it can."""
    dt = ws.dtype(key)
    module = key.removesuffix(".weight")
    if any(ws.shape(key + m) is not None or ws.shape(module + m) is not None for m in BNB_MARKERS):
        return f"bitsandbytes-quantized ({dt} storage with a quant state) is not supported: {QUANT_HINT}"
    if dt in ("F4", "F6_E2M3", "F6_E3M2"):
        return f"{dt} (4/6-bit float, MX/NVFP4) is not supported: {QUANT_HINT}"
    if dt not in EDITABLE:
        return f"{dt} is not a weight dtype vpatch edits (it never converts silently): {QUANT_HINT}"
    if dt in FP8:
        if any(ws.shape(n) is not None for n in _names(key, BLOCK_SCALE_NAMES)):
            return f"{dt} with block-wise scales ({_names(key, BLOCK_SCALE_NAMES)[0]}) is not supported: {QUANT_HINT}"
        found = [n for n, _ in _scales(ws, key)]
        if len(found) > 1:
            return f"{dt} weight has two scale tensors ({', '.join(found)}); which one applies is ambiguous"
        if found:
            shp, rows = ws.shape(found[0]), ws.shape(key)[0]
            n = 1
            for d in shp:
                n *= d
            if not (n == 1 or tuple(shp) in ((rows,), (rows, 1))):
                return f"scale {found[0]} has shape {list(shp)}; only per-tensor (1 value) and per-row ({rows}) scales are supported"
            if ws.dtype(found[0]) not in FLOAT_DTYPES:
                return f"scale {found[0]} is {ws.dtype(found[0])}; expected F32, F16 or BF16"
    return None


@dataclass
class Codec:
    """How a stored tensor's rows map to fp32 and back: a plain cast for F32/F16/BF16, and for fp8
    ``W = stored * scale`` (scale per row, or one value) re-encoded with the same scale."""

    dtype: torch.dtype
    scale: torch.Tensor | None = None  # fp8: fp32, shape (rows, 1) or (1, 1)
    scale_key: str | None = None
    convention: str = "float"

    @property
    def saturates(self) -> bool:
        """fp8 encoding clamps to the format's range, so overflow must be looked for before it."""
        return self.scale is not None

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        return self.scale if self.scale.shape[0] == 1 else self.scale[r0:r1]

    def decode(self, q: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the stored tensor as a new fp32 tensor."""
        w = q.to(torch.float32, copy=True)
        return w if self.scale is None else w.mul_(self._rows(r0, r1))

    def encode(self, w: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, int]:
        """fp32 rows back to the stored dtype, and how many values saturated (fp8 only)."""
        if self.scale is None:
            return w.to(self.dtype), 0
        mx = float(torch.finfo(self.dtype).max)
        x = w / self._rows(r0, r1)
        over = int((x.abs() > mx).sum())
        return x.clamp_(-mx, mx).to(self.dtype), over


def codec_for(ws: WeightSet, key: str) -> Codec:
    """The codec of a targeted tensor (``dtype_refusal`` has accepted it)."""
    dt = ws.dtype(key)
    if dt not in FP8:
        return Codec(TORCH_DTYPES[dt])
    rows = ws.shape(key)[0]
    for name, conv in _scales(ws, key):
        with TensorReader(ws.headers[ws.key_file[name]]) as rd:
            s = rd.tensor(name).to(torch.float32).reshape(-1, 1)
        if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
            raise DtypeError(
                f"scale {name} holds zero, NaN or Inf values; the fp8 tensor {key} cannot be dequantized"
            )
        return Codec(FP8[dt], s if s.shape[0] == rows else s[:1], name, conv)
    return Codec(FP8[dt], torch.ones(1, 1), None, "unscaled")
