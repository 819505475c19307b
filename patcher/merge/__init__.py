"""The streaming merge: plan a delta against a checkpoint, then apply or revert it.

``plan`` (where each entry lands, as ``EditOp``s), ``kernel`` (the streaming row loop), ``records``
(revert records), ``provenance`` (the ``vpatch.applied`` record), ``writer`` (a whole output,
atomically), ``engine`` (apply and revert).
"""

from .engine import Report, apply_delta, revert_delta
from .ops import EditOp, EditStats
from .plan import Plan, plan_apply

__all__ = ["EditOp", "EditStats", "Plan", "Report", "apply_delta", "plan_apply", "revert_delta"]
