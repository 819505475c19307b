"""The ``vpatch`` command: a thin click shell over the Python API.

Results go to stdout (``--json`` for machines); progress, tables and warnings go to stderr.
A ``VpatchError`` is printed on one line with exit code 2 and no traceback.
"""

from . import evaluate, probing, sharing, tuning, weights  # noqa: F401  (each registers its verbs)
from .common import main

__all__ = ["main"]
