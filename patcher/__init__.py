"""vpatch: remove a concept from a text-to-video model by a low-rank edit baked into its weights.

The Python API; the ``vpatch`` command only wraps it.
"""

__version__ = "0.1.0"

from .errors import VpatchError  # noqa: E402
from .delta import Delta, DeltaEntry, read_delta, write_delta, projection_entry  # noqa: E402
from .merge import apply_delta, plan_apply, revert_delta, Report  # noqa: E402
from .inspect import inspect_path  # noqa: E402

__all__ = [
    "__version__", "VpatchError", "Delta", "DeltaEntry", "read_delta", "write_delta", "projection_entry",
    "apply_delta", "plan_apply", "revert_delta", "Report", "inspect_path",
]
