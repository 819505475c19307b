"""vpatch: remove a concept from a text-to-video model by a low-rank edit baked into its weights.

The Python API; the ``vpatch`` command only wraps it.
"""

from ._version import __version__
from .errors import VpatchError
from .inspection import inspect_path
from .merge.engine import Report, apply_delta, plan_apply, revert_delta
from .naming import derived_output
from .vud.combine import merge_deltas
from .vud.delta import Delta, DeltaEntry, projection_entry, read_delta, write_delta
from .vud.lora import export_lora, lora_to_delta

__all__ = [
    "__version__",
    "VpatchError",
    "Delta",
    "DeltaEntry",
    "read_delta",
    "write_delta",
    "projection_entry",
    "apply_delta",
    "plan_apply",
    "revert_delta",
    "Report",
    "inspect_path",
    "derived_output",
    "merge_deltas",
    "export_lora",
    "lora_to_delta",
]
