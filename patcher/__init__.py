"""vpatch: remove a concept from a text-to-video model by a low-rank edit baked into its weights.

The Python API; the ``vpatch`` command only wraps it.
"""

from ._version import __version__
from .errors import VpatchError
from .vud.delta import Delta, DeltaEntry, read_delta, write_delta, projection_entry
from .merge.engine import apply_delta, plan_apply, revert_delta, Report
from .inspection import inspect_path

__all__ = [
    "__version__", "VpatchError", "Delta", "DeltaEntry", "read_delta", "write_delta", "projection_entry",
    "apply_delta", "plan_apply", "revert_delta", "Report", "inspect_path",
]
