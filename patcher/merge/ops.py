"""The merge's values: a planned edit operation in, an edit-statistics record out.

``EditOp`` is what planning produces and every consumer of a plan reads: ``apply`` and ``revert``
stream these through the kernel; an adapter export (LoRA) can write the same factors instead of
merging them. ``EditStats`` is what the kernel reports for each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import Codec

PROJECT = "project_input"
MAP = "map_input"
ADD = "add"
RECOMPUTED = (PROJECT, MAP)  # kinds whose U is recomputed from the target's own weight


@dataclass(frozen=True, eq=False)
class EditOp:
    """One edit of one stored tensor, or of one row block of a fused tensor.

    For the rows ``rows`` (all rows when None) of the tensor ``key`` in ``file``, with W those rows:

    - ``recompute`` True (a ``project_input`` entry in the default mode): W ← W − λ (W V) Vᵀ with
      λ = ``strength``: the projection is recomputed from the target's own weight, so it is exact on
      a fine-tune too. With ``P`` set (a ``map_input`` entry), W ← W + λ (W P) Vᵀ instead: the
      input-side map I + λ P Vᵀ, again recomputed from the target's own rows.
    - ``recompute`` False: W ← W + ``strength`` · U Vᵀ with the delta's factors as stored (for a
      ``project_input`` entry U = −λ W_base V, computed at the probed base).

    The edit is rank ``V.shape[1]``; as an adapter, up = ``strength`` · U (or −λ W V) and down = Vᵀ.
    ``base_sha256`` is the sha256 of the stored bytes of these rows in the probed base (None when
    the delta does not say); ``codec`` maps the stored dtype to fp32 and back (fp8 with its scale).
    """

    entry: str  # the delta entry, "component/diffusers.key"
    kind: str  # the entry's kind: project_input | map_input | add
    file: Path  # the safetensors file that holds the target
    key: str  # the stored key in that file
    rows: tuple[int, int] | None  # row block of a fused tensor; None: every row
    shape: tuple[int, int]  # (rows, cols) of the edited block
    dtype: str  # stored dtype
    codec: Codec
    U: torch.Tensor  # (rows, rank) fp32
    V: torch.Tensor  # (cols, rank) fp32
    strength: float
    recompute: bool
    base_sha256: str | None = None
    base_dtype: str | None = None  # the dtype the delta was probed from
    P: torch.Tensor | None = None  # map_input with recompute: U = λ W P from the target's own W

    @property
    def rank(self) -> int:
        return int(self.V.shape[1])

    def label(self) -> str:
        return self.key if self.rows is None else f"{self.key}[{self.rows[0]}:{self.rows[1]}]"


@dataclass(frozen=True, eq=False)
class Restore:
    """Revert only: stored values to put back at flat positions (within the op's rows) that the
    inverse edit alone would miss by rounding."""

    index: torch.Tensor  # int64, flat positions
    value: torch.Tensor  # the original stored values, in the stored dtype


@dataclass(frozen=True, eq=False)
class Captured:
    """Apply with a revert record: the U rows that were added, and what an inverse edit would miss."""

    U: torch.Tensor
    restore: Restore


@dataclass(frozen=True)
class EditStats:
    """What one edit did, measured while streaming."""

    key: str  # stored key
    file: str
    dtype: str
    rows: int
    cols: int
    entry: str = ""  # the delta entry behind this edit
    row_range: list[int] | None = None  # [a, b) within a fused tensor
    saturated: int = 0  # fp8: values clamped to the format's range
    intended_norm: float = 0.0
    rounding_error: float = 0.0  # ‖effective - intended‖ / ‖intended‖
    changed_fraction: float = 0.0
    base_match: bool | None = None  # the input rows' sha256 equals the op's base_sha256
    sha256_in: str = ""
    sha256_out: str = ""
    exact: bool | None = None  # revert only: output bytes match the original fingerprint


@dataclass(frozen=True, eq=False)
class EditResult:
    stats: EditStats
    captured: Captured | None = None
